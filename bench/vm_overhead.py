"""What medhive adds to one VM, and how fast the network gateway leases and forwards.

`python -m bench.vm_overhead [--n 11] [--net-n 200]`

VM overhead: the tiny test guest (Debian's cloud kernel and a busybox initramfs that
powers off as soon as it is up) runs as a medhive VM job, from `POST /v1/jobs` until
the job API shows it terminal (polled every 20 ms), alternating with the same guest
run on bare libvirt: define, create, wait for the STOPPED lifecycle event, undefine,
from the same process's view. One warm-up of each is not counted. Target:
`overhead_s` (median medhive - median libvirt) <= 1.0.

Gateway: a stand-in guest (a namespace on the guests' network holding every pool
address, with a TCP listener) answers at once, so a lease plus a forward measures
netgw itself: request to reply over RabbitMQ, the store, dnsmasq's hosts file, the
reachability check and the nftables rule. Each cycle is lease, forward, then release
(not timed), then the reference: a request netgw answers from memory (releasing a
lease that does not exist), which is the broker round trip and the consume wrapper
alone (`empty_request_p50_ms`). Target: `lease_forward_p99_ms` <= 20.

The gateway's reference, measured in turn with each cycle: two requests to a bare
aio-pika responder that stores one document per request in the same database server
(`bench/bare_rpc.py`): `bare_pair_p50_ms`, `bare_pair_p99_ms`, the floor that the
broker, the database and Python set on this machine for any lease plus forward.

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import libvirt
import libvirtaio
from pydantic import SecretStr

from bench.bare_rpc import BareClient, start_responder
from bench.jobs import timed_job
from bench.stack import Stack, bench_stack, progress
from medhive.client import Client
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.net import NetForward, NetForwarded, NetLease, NetLeased, NetRelease
from shared.settings import AmqpSettings
from tests.fixtures.vmnet import BANNER_SERVER, VmNet, build_vmnet, sh

GUEST_DIR = Path(os.environ.get("MEDHIVE_TEST_GUEST_DIR", "/var/lib/medhive/guest"))
URI = "qemu:///system"
JOB_TIMEOUT_S = 180.0
WARMUP = 1
GUEST_PORT = 2222
BARE_XML = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory>
<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>
<initrd>{initrd}</initrd><cmdline>console=ttyS0 panic=-1</cmdline></os>
<features><acpi/></features><on_poweroff>destroy</on_poweroff><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{console}'/><target port='0'/></serial>
<memballoon model='none'/></devices></domain>"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# -- VM overhead ------------------------------------------------------------------


async def medhive_vm(api: Client, base: Path, name: str) -> float:
    spec = {
        "kind": "vm",
        "name": name,
        "image": str(base),
        "resources": {"cpus": 1, "memory_mb": 256},
        "vm": {"kernel": str(GUEST_DIR / "vmlinuz"), "initrd": str(GUEST_DIR / "initrd.img")},
    }
    elapsed, _ = await timed_job(api, spec, JOB_TIMEOUT_S)
    return elapsed


class BareLibvirt:
    """The reference: the same guest through libvirt's API, nothing else."""

    def __init__(self, workdir: Path) -> None:
        libvirtaio.virEventRegisterAsyncIOImpl()
        self.conn = libvirt.open(URI)
        self.workdir = workdir
        self.stopped: dict[str, asyncio.Event] = {}
        self.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None
        )

    def _on_event(self, _c: Any, dom: Any, event: int, _d: int, _o: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and dom.name() in self.stopped:
            self.stopped[dom.name()].set()

    async def run(self, base: Path) -> float:
        name = f"bench-bare-{uuid.uuid4().hex[:8]}"
        disk = self.workdir / f"{name}.qcow2"
        xml = BARE_XML.format(
            name=name, kernel=GUEST_DIR / "vmlinuz", initrd=GUEST_DIR / "initrd.img",
            disk=disk, console=self.workdir / f"{name}.log",
        )  # fmt: skip
        stopped = self.stopped[name] = asyncio.Event()
        started = time.perf_counter()
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(disk)],
            check=True,
        )
        domain = await asyncio.to_thread(self.conn.defineXML, xml)
        await asyncio.to_thread(domain.create)
        await asyncio.wait_for(stopped.wait(), JOB_TIMEOUT_S)
        await asyncio.to_thread(domain.undefine)
        elapsed = time.perf_counter() - started
        disk.unlink()
        del self.stopped[name]
        return elapsed

    def close(self) -> None:
        self.conn.close()


async def vm_overhead(stack: Stack, n: int) -> dict[str, Any]:
    base = stack.workdir / "base.qcow2"
    made = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"
    )
    await made.wait()
    bare = BareLibvirt(stack.workdir)
    medhive_times: list[float] = []
    libvirt_times: list[float] = []
    try:
        async with stack.client() as api:
            for i in range(WARMUP):
                m, b = await medhive_vm(api, base, f"warmup-{i}"), await bare.run(base)
                progress(f"warm-up medhive {m:.3f} s, libvirt {b:.3f} s")
            for i in range(n):
                stack.check_alive()
                medhive_times.append(await medhive_vm(api, base, f"vm-{i}"))
                libvirt_times.append(await bare.run(base))
                progress(f"run {i + 1}/{n}: medhive {medhive_times[-1]:.3f} s, "
                         f"libvirt {libvirt_times[-1]:.3f} s")  # fmt: skip
    finally:
        bare.close()
    medhive_median = statistics.median(medhive_times)
    libvirt_median = statistics.median(libvirt_times)
    return {
        "medhive_median_s": round(medhive_median, 3),
        "libvirt_median_s": round(libvirt_median, 3),
        "overhead_s": round(medhive_median - libvirt_median, 3),
        "n": n,
        "medhive_min_max_s": [round(min(medhive_times), 3), round(max(medhive_times), 3)],
        "libvirt_min_max_s": [round(min(libvirt_times), 3), round(max(libvirt_times), 3)],
    }


# -- netgw ------------------------------------------------------------------------


def stand_in_guest(net: VmNet, cleanup: ExitStack) -> None:
    """A namespace on the guests' network answering on every pool address."""
    name = f"mhb-{uuid.uuid4().hex[:6]}"
    sh("ip", "netns", "add", name)
    cleanup.callback(sh, "ip", "netns", "del", name)
    sh("ip", "link", "add", "link", net.uplink, "name", name, "type", "macvlan", "mode", "bridge")
    sh("ip", "link", "set", name, "netns", name)
    sh("ip", "link", "set", name, "up", netns=name)
    for host in range(100, 200):
        sh("ip", "addr", "add", f"10.77.0.{host}/24", "dev", name, netns=name)
    server = subprocess.Popen(
        ["ip", "netns", "exec", name, sys.executable, "-c", BANNER_SERVER, str(GUEST_PORT), "hi"],
        stdout=subprocess.PIPE,
    )
    cleanup.callback(server.wait)
    cleanup.callback(server.kill)
    assert server.stdout is not None
    cleanup.callback(server.stdout.close)
    assert server.stdout.readline().strip() == b"listening"


async def lease_forward(stack: Stack, n: int) -> dict[str, Any]:
    bus = Bus(AmqpSettings(url=SecretStr(stack.amqp_url)), "bench@vm_overhead")
    await bus.connect()
    responder = start_responder(stack.amqp_url, stack.mongo_url)
    bare = BareClient(stack.amqp_url)
    await bare.connect()
    times: list[float] = []
    bare_times: list[float] = []
    parts: dict[str, list[float]] = {"lease": [], "forward": [], "empty_request": []}
    try:
        for i in range(n + 10):
            job = f"bench-{i}"
            until = utcnow() + timedelta(hours=1)
            started = time.perf_counter()
            leased = await bus.request(
                "net.lease", NetLease(job_id=job, attempt=1, node_id="bench", expires_at=until)
            )
            between = time.perf_counter()
            forwarded = await bus.request(
                "net.forward",
                NetForward(job_id=job, attempt=1, name="ssh", port=GUEST_PORT, wait_s=5),
            )
            elapsed = time.perf_counter() - started
            if not (isinstance(leased, NetLeased) and isinstance(forwarded, NetForwarded)):
                raise RuntimeError(f"{leased!r} / {forwarded!r}")
            await bus.request("net.release", NetRelease(job_id=job, attempt=1))
            # The reference: a request netgw answers from memory (a release of nothing),
            # i.e. the broker round trip and the consume wrapper, nothing of netgw's own.
            empty = time.perf_counter()
            await bus.request("net.release", NetRelease(job_id=f"none-{i}", attempt=1))
            parts["empty_request"].append((time.perf_counter() - empty) * 1000)
            # The reference, in turn with the above: two bare requests, one stored document each.
            bare_started = time.perf_counter()
            await bare.request()
            await bare.request()
            bare_elapsed = time.perf_counter() - bare_started
            if i >= 10:  # the first ten warm the connections and caches up
                times.append(elapsed * 1000)
                bare_times.append(bare_elapsed * 1000)
                parts["lease"].append((between - started) * 1000)
                parts["forward"].append((started + elapsed - between) * 1000)
    finally:
        await bare.close()
        responder.kill()
        responder.wait()
        await bus.close()
    return {
        "lease_forward_p50_ms": round(percentile(times, 0.5), 2),
        "lease_forward_p99_ms": round(percentile(times, 0.99), 2),
        "bare_pair_p50_ms": round(percentile(bare_times, 0.5), 2),
        "bare_pair_p99_ms": round(percentile(bare_times, 0.99), 2),
        "lease_forward_n": n,
        **{
            f"{k}_p50_ms": round(statistics.median(v[10:] if k == "empty_request" else v), 2)
            for k, v in parts.items()
        },
    }


async def main(n: int, net_n: int) -> dict[str, Any]:
    with build_vmnet() as net, ExitStack() as cleanup:
        stand_in_guest(net, cleanup)
        node_env = {
            "MEDHIVE_VMNODE_RUNTIME": "docker",
            "MEDHIVE_VMNODE_LIBVIRT_URI": URI,
            "MEDHIVE_VMNODE_VM_DIR": f"/var/lib/medhive/bench-vms-{uuid.uuid4().hex[:6]}",
            "MEDHIVE_VMNODE_VM_SHUTDOWN_GRACE_S": "5",
        }
        async with bench_stack(nodes=1, node_env=node_env, netgw_env=net.netgw_env()) as stack:
            result = await vm_overhead(stack, n)
            result.update(await lease_forward(stack, net_n))
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    # Under software emulation the guest's run times cluster about a second apart on
    # both sides, so a few runs more keep one slow run from moving a median by a second.
    parser.add_argument("--n", type=int, default=11, help="measured VM runs of each (default 11)")
    parser.add_argument("--net-n", type=int, default=200, help="lease+forward cycles")
    args = parser.parse_args()
    if args.n < 1 or args.net_n < 1:
        parser.error("--n and --net-n must be at least 1")
    result = asyncio.run(main(args.n, args.net_n))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli()
