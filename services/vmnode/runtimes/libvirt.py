"""VMs through libvirt (QEMU, or KVM where the host has it), with medhive's confinement.

One attempt is one persistent domain, `medhive-<job>-<attempt>`, on a qcow2 overlay of
the job's base image, with the inputs on a read-only ISO or a writable disk, results
on that disk, the serial console in a file (the job's log), and a NIC only when the
job has interactive ports: the network gateway leases its MAC and IP. The domain's
metadata records the attempt, so a restarted agent finds it (`list_own`).

libvirt calls block, so they run in threads. Lifecycle events arrive on the loop
through libvirtaio and wake `wait` at once; a slow poll covers the time a connection
is being reopened, when events may be missed.

One module because every `Runtime` method goes through the one libvirt connection this
class reopens when it dies, and `wait` and `stop` rely on the lifecycle events that
connection delivers into `_stopped`; the domain's XML and its disks are in domain.py
and vmdisks.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirtaio
import structlog

from services.vmnode.domain import (
    PREFIX,
    Nic,
    VmLayout,
    VmRecord,
    domain_name,
    domain_xml,
    read_record,
    record_of,
)
from services.vmnode.guestnet import GuestNetwork, NetworkRefused
from services.vmnode.runtimes.base import (
    EngineUnavailable,
    ExitInfo,
    ImageMissing,
    Mount,
    OnThisHost,
    Output,
    State,
    Workload,
    WorkloadGone,
    WorkloadRefused,
    keep_tail,
)
from services.vmnode.settings import NodeSettings
from services.vmnode.vmdisks import make_disk, make_iso, make_overlay, read_outputs
from shared.bus import NoReply
from shared.envelope import utcnow
from shared.messages.jobs import NodeRun

log = structlog.get_logger("medhive.vmnode.libvirt")

T = TypeVar("T")

#: How often `wait` looks at a domain when no event wakes it first.
POLL_S = 2.0
#: Files in an attempt's directory holding when its guest started and stopped.
STARTED_MARK = "started_at"
FINISHED_MARK = "finished_at"
#: libvirt's shutoff reasons that mean the guest itself ended.
_GUEST_ENDED = {libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF_DAEMON}
_FAILED = {libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED}


class LibvirtRuntime(OnThisHost):
    """A `Runtime` for `vm` jobs."""

    kinds: tuple[str, ...] = ("vm",)

    def __init__(self, settings: NodeSettings, network: GuestNetwork | None) -> None:
        self.settings = settings
        self.network = network
        self._conn: libvirt.virConnect | None = None
        self._connecting = asyncio.Lock()
        self._stopped: dict[str, asyncio.Event] = {}
        self._callback: int | None = None

    # -- the connection -------------------------------------------------------------

    async def _connection(self) -> libvirt.virConnect:
        async with self._connecting:
            if self._conn is not None and self._conn.isAlive():
                return self._conn
            events = _events_on_this_loop()
            try:
                conn = await asyncio.to_thread(libvirt.open, self.settings.libvirt_uri)
            except libvirt.libvirtError as exc:
                raise EngineUnavailable(f"libvirt at {self.settings.libvirt_uri}: {exc}") from exc
            if events:
                self._callback = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            self._conn = conn
            return conn

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self._stop_event(dom.name()).set()

    def _stop_event(self, name: str) -> asyncio.Event:
        return self._stopped.setdefault(name, asyncio.Event())

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """A blocking libvirt call in a thread, its errors as the runtime's exceptions."""
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as exc:
            code = exc.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise WorkloadGone(str(exc)) from exc
            if code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR) and (
                self._conn is None or not self._conn.isAlive()
            ):
                raise EngineUnavailable(str(exc)) from exc
            raise

    async def _domain(self, name: str) -> libvirt.virDomain:
        conn = await self._connection()
        return await self._call(conn.lookupByName, name)

    # -- Runtime --------------------------------------------------------------------

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        vm = run.spec.vm
        assert vm is not None, "a vm job has guest settings"
        name = domain_name(run.job_id, run.attempt)
        conn = await self._connection()
        with contextlib.suppress(WorkloadGone):
            existing = await self._call(conn.lookupByName, name)
            return await self._workload(existing)  # a redelivered node.run
        for path in (run.spec.image, vm.kernel, vm.initrd):
            if path is not None and not await asyncio.to_thread(Path(path).is_file):
                raise ImageMissing(f"{path} is not on node {self.settings.node_id}")
        base = Path(run.spec.image)
        layout = VmLayout(self.settings.vm_dir / name)
        await asyncio.to_thread(_fresh_directory, layout.directory)
        try:
            await make_overlay(base, layout.overlay)
            has_iso = vm.data_method == "iso" and await make_iso(mounts, layout.iso)
            has_disk = vm.data_method == "disk" or run.spec.outputs is not None
            if has_disk:
                await make_disk(
                    layout.disk, vm.disk_size_mb, vm.filesystem, mounts, vm.data_method == "disk"
                )
            nic = await self._nic(run) if vm.interactive else None
            record = record_of(run, self.settings.node_id, has_disk)
            xml = domain_xml(
                run,
                record,
                layout,
                domain_type=self.settings.vm_domain_type,
                has_iso=has_iso,
                nic=nic,
            )
            domain = await self._call(conn.defineXML, xml)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, layout.directory, True)
            if vm.interactive and self.network is not None:
                with contextlib.suppress(NoReply):
                    await self.network.release(
                        run.job_id, run.attempt, run.tenant, "the VM was not created"
                    )
            raise
        log.info("domain_defined", domain=name, iso=has_iso, disk=has_disk, nic=nic is not None)
        return await self._workload(domain)

    async def _nic(self, run: NodeRun) -> Nic:
        if self.network is None or self.settings.vm_network is None:
            raise WorkloadRefused(
                f"node {self.settings.node_id} has no guest network for interactive ports"
            )
        try:
            mac, _ = await self.network.lease(run.job_id, run.attempt, run.tenant, run.deadline)
        except NetworkRefused as exc:
            raise WorkloadRefused(str(exc)) from exc
        except NoReply as exc:
            raise EngineUnavailable(f"the network gateway did not answer: {exc}") from exc
        return Nic(mac, self.settings.vm_network)

    async def start(self, workload: Workload) -> None:
        domain = await self._domain(workload.id)
        self._stop_event(workload.id).clear()
        try:
            await self._call(domain.create)
        except libvirt.libvirtError as exc:
            raise WorkloadRefused(f"the VM did not start: {exc.get_error_message()}") from exc
        await self._mark(workload, STARTED_MARK)

    async def started_at(self, workload: Workload) -> datetime | None:
        return await self._mark(workload, STARTED_MARK, write=False)

    async def _mark(self, workload: Workload, name: str, write: bool = True) -> datetime | None:
        """A moment of the attempt kept beside its disks: libvirt records neither when a
        domain started nor when it stopped, and a restarted agent must say the same
        times again. Written once; later calls read what the first one wrote."""
        path = self.settings.vm_dir / workload.id / name

        def mark() -> datetime | None:
            if path.exists():
                return datetime.fromisoformat(path.read_text().strip())
            if not write or not path.parent.is_dir():
                return None
            now = utcnow()
            path.write_text(now.isoformat())
            return now

        return await asyncio.to_thread(mark)

    async def wait(self, workload: Workload) -> ExitInfo:
        stopped = self._stop_event(workload.id)
        while True:
            # Cleared before the state is read: an event that arrives while it is being
            # read then still wakes the wait below, instead of being cleared unseen.
            stopped.clear()
            domain = await self._domain(workload.id)
            state, reason = await self._call(domain.state)
            if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                ended = await self._mark(workload, FINISHED_MARK)
                return replace(_exit_info(state, reason), finished_at=ended)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), POLL_S)

    async def stop(self, workload: Workload, grace_s: float) -> None:
        """ACPI power button, then destroy after `grace_s` (the guest may ignore it)."""
        try:
            domain = await self._domain(workload.id)
            if not await self._call(domain.isActive):
                return
            with contextlib.suppress(libvirt.libvirtError):
                await self._call(domain.shutdown)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(workload), grace_s)
            if await self._call(domain.isActive):
                log.info("domain_destroyed", domain=workload.id, after_s=grace_s)
                with contextlib.suppress(libvirt.libvirtError):
                    await self._call(domain.destroy)
        except WorkloadGone:
            return

    async def output(self, workload: Workload, limit: int) -> Output:
        """The serial console is the job's log (stdout)."""
        console = VmLayout(self.settings.vm_dir / workload.id).console
        try:
            text = await asyncio.to_thread(_tail, console, limit)
        except FileNotFoundError:
            text = ""
        stdout, cut = keep_tail(text, limit)
        return Output(stdout, "", stdout_truncated=cut)

    async def expose(self, workload: Workload) -> dict[str, str]:
        """Forward each interactive port once the guest answers on it: name -> host:port."""
        record = await self._record(workload.id)
        if record is None or not record.interactive or self.network is None:
            return {}
        endpoints = {}
        for name, port in record.interactive.items():
            endpoints[name] = await self.network.forward(
                workload.job_id, workload.attempt, workload.tenant, name, port, workload.deadline
            )
        return endpoints

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        """Copy `outputs/` of the writable disk (the guest has stopped) into `into`."""
        record = await self._record(workload.id)
        if record is None or record.filesystem is None:
            return
        disk = VmLayout(self.settings.vm_dir / workload.id).disk
        await read_outputs(disk, record.filesystem, into)

    async def remove(self, workload: Workload) -> None:
        """Destroy and undefine the domain, delete its files, release its network (if it
        had one: a VM without interactive ports never leased an address, and asking
        netgw anyway would hold the job's clean-up until the request timed out)."""
        leased = True  # a domain already gone says nothing: ask, releasing is idempotent
        with contextlib.suppress(WorkloadGone):
            domain = await self._domain(workload.id)
            record = read_record(await self._call(domain.XMLDesc, 0))
            leased = record is None or bool(record.interactive)
            if await self._call(domain.isActive):
                with contextlib.suppress(libvirt.libvirtError):
                    await self._call(domain.destroy)
            with contextlib.suppress(WorkloadGone):
                await self._call(domain.undefine)
        await asyncio.to_thread(shutil.rmtree, self.settings.vm_dir / workload.id, True)
        self._stopped.pop(workload.id, None)
        if self.network is not None and leased:
            try:
                await self.network.release(
                    workload.job_id, workload.attempt, workload.tenant, "the job ended"
                )
            except NoReply:
                # netgw's sweeper frees the lease when it expires with the job.
                log.warning("network_release_unanswered", domain=workload.id)

    async def list_own(self) -> list[Workload]:
        conn = await self._connection()
        domains = await self._call(conn.listAllDomains, 0)
        own = []
        for domain in domains:
            if not domain.name().startswith(PREFIX):
                continue
            with contextlib.suppress(WorkloadGone):
                workload = await self._workload(domain)
                if workload is not None:
                    own.append(workload)
        return own

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(libvirt.libvirtError):
                if self._callback is not None:
                    conn.domainEventDeregisterAny(self._callback)
                await asyncio.to_thread(conn.close)
            self._callback = None

    # -- helpers --------------------------------------------------------------------

    async def _record(self, name: str) -> VmRecord | None:
        domain = await self._domain(name)
        return read_record(await self._call(domain.XMLDesc, 0))

    async def _workload(self, domain: libvirt.virDomain) -> Workload:
        record = read_record(await self._call(domain.XMLDesc, 0))
        if record is None or record.node_id != self.settings.node_id:
            raise WorkloadGone(f"{domain.name()} is not a medhive domain of this node")
        state, reason = await self._call(domain.state)
        return Workload(
            id=domain.name(),
            job_id=record.job_id,
            attempt=record.attempt,
            tenant=record.tenant,
            deadline=record.deadline_at,
            state=_state(state, reason),
            kind="vm",
        )


def _state(state: int, reason: int) -> State:
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED):
        return "running"
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN:
        return "created"  # defined, never started
    if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
        return "exited"
    return "other"


def _exit_info(state: int, reason: int) -> ExitInfo:
    """A guest that powered itself off succeeded; one that crashed or failed did not."""
    if state == libvirt.VIR_DOMAIN_CRASHED or reason in _FAILED:
        return ExitInfo(exit_code=1, oom_killed=False)
    if reason in _GUEST_ENDED:
        return ExitInfo(exit_code=0, oom_killed=False)
    return ExitInfo(exit_code=137, oom_killed=False)  # destroyed from outside the guest


_registered_loop: asyncio.AbstractEventLoop | None = None


def _events_on_this_loop() -> bool:
    """Register libvirtaio with the running loop, once per process (libvirt allows one
    event implementation). Another loop later (tests) gets no events and relies on the
    poll."""
    global _registered_loop
    loop = asyncio.get_running_loop()
    if _registered_loop is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop)
        _registered_loop = loop
    return _registered_loop is loop


def _fresh_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True)


def _tail(path: Path, limit: int) -> str:
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(size - limit, 0))
        return handle.read().decode("utf-8", "replace")
