"""Containers through the Docker engine API (aiodocker), with medhive's isolation.

`container_config` is the one place that decides how a workload is confined: no
network, read-only root, no capabilities, no privilege gain, a non-root user, and
hard memory, swap, CPU and process limits. Containers are named deterministically
after (node, job, attempt), so Docker itself refuses a second container for a
redelivered command, and labelled, so a restarted agent finds its own.

One module because what `container_config` writes into a container is what
`DockerRuntime` relies on later: `prepare` reuses the container its name finds on a
409, `list_own` and `workload_from` read its labels back after a restart, and `output`
reads the log that `log_max_size` sized for the reported tail.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker
import structlog
from aiodocker.containers import DockerContainer

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
from shared.messages.jobs import NodeRun

log = structlog.get_logger("medhive.vmnode.docker")

MANAGED = "medhive.managed"
MIB = 1024 * 1024
#: aiodocker's status for "no answer from the daemon" (a connection error).
UNREACHABLE = 900
#: Scratch space: writable, but nothing on it can be executed.
TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def container_name(node_id: str, job_id: str, attempt: int) -> str:
    """A valid, unique container name for one attempt on one node."""
    digest = hashlib.sha256(f"{node_id}\0{job_id}\0{attempt}".encode()).hexdigest()[:16]
    return f"medhive-{_UNSAFE.sub('-', job_id)[:48]}-{attempt}-{digest}"


def labels(run: NodeRun, node_id: str) -> dict[str, str]:
    """The labels that make a container this node's durable record of `run`."""
    return {
        "medhive.job_id": run.job_id,
        "medhive.attempt": str(run.attempt),
        "medhive.node": node_id,
        "medhive.tenant": run.tenant,
        "medhive.deadline": run.deadline.isoformat(),
        MANAGED: "1",
    }


def log_max_size(limit: int) -> str:
    """json-file rotation size; two files are kept, so a container writes at most twice this.

    Room for the reported tail plus the JSON framing of each line (~70 bytes): output
    whose lines average 10 bytes or more still fills the whole tail.
    """
    return f"{max(8 * limit // 1024, 1024)}k"


def container_config(
    run: NodeRun, settings: NodeSettings, mounts: Sequence[Mount] = ()
) -> dict[str, Any]:
    """The create body for `run`: the image and command, inside medhive's confinement.

    `mounts` are the job's own directories (its inputs, read-only, and /outputs); they
    are bind mounts with private propagation, so nothing mounted later leaks in.
    """
    spec = run.spec
    memory = spec.resources.memory_mb * MIB
    config: dict[str, Any] = {
        "Image": spec.image,
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "User": settings.workload_user,
        "Labels": labels(run, settings.node_id),
        "Tty": False,
        "OpenStdin": False,
        "StopTimeout": math.ceil(settings.stop_grace_s),
        "HostConfig": {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Privileged": False,
            "IpcMode": "private",
            # tini as PID 1: SIGTERM reaches the workload and zombies are reaped.
            "Init": True,
            "PidsLimit": spec.resources.pids,
            "Memory": memory,
            "MemorySwap": memory,  # equal to Memory: no swap at all
            "NanoCpus": int(spec.resources.cpus * 1e9),
            "Tmpfs": dict(TMPFS),
            "RestartPolicy": {"Name": "no"},
            "AutoRemove": False,  # the agent removes it after reporting
            "LogConfig": {
                "Type": "json-file",
                "Config": {"max-size": log_max_size(settings.log_limit_bytes), "max-file": "2"},
            },
        },
    }
    if mounts:
        config["HostConfig"]["Mounts"] = [
            {"Type": "bind", "Source": str(m.source), "Target": m.target, "ReadOnly": m.read_only,
             "BindOptions": {"Propagation": "rprivate"}}
            for m in mounts
        ]  # fmt: skip
    if spec.command is not None:
        config["Cmd"] = list(spec.command)
    if spec.workdir is not None:
        config["WorkingDir"] = spec.workdir
    return config


#: Stream numbers in the frames of a container's log without a TTY.
STDOUT, STDERR = 1, 2


def split_streams(raw: bytes) -> tuple[bytes, bytes]:
    """stdout and stderr from Docker's multiplexed log: frames of an 8-byte header
    (stream number, three zero bytes, payload length as a big-endian uint32) and the
    payload. A frame cut short at the end keeps what arrived."""
    streams = {STDOUT: bytearray(), STDERR: bytearray()}
    at = 0
    while at + 8 <= len(raw):
        stream, size = raw[at], int.from_bytes(raw[at + 4 : at + 8], "big")
        if stream in streams:
            streams[stream] += raw[at + 8 : at + 8 + size]
        at += 8 + size
    return bytes(streams[STDOUT]), bytes(streams[STDERR])


async def read_logs(docker: aiodocker.Docker, path: str, limit: int) -> Output:
    """Both streams of a container's or a service's log (`path`, the engine's logs
    route), in one request, each cut to its last `limit` characters."""
    params = {"stdout": "1", "stderr": "1"}
    try:
        async with docker._query(path, params=params) as got:
            stdout, stderr = split_streams(await got.read())
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise WorkloadGone(exc.message) from exc
        raise
    stdout_text, out_cut = keep_tail(stdout.decode("utf-8", "replace"), limit)
    stderr_text, err_cut = keep_tail(stderr.decode("utf-8", "replace"), limit)
    return Output(stdout_text, stderr_text, out_cut, err_cut)


_STATES: dict[str, State] = {"created": "created", "running": "running", "exited": "exited"}


def workload_from(container_id: str, state: str, container_labels: dict[str, str]) -> Workload:
    """A handle from what Docker reports of a container (list or inspect)."""
    return Workload(
        id=container_id,
        job_id=container_labels["medhive.job_id"],
        attempt=int(container_labels["medhive.attempt"]),
        tenant=container_labels.get("medhive.tenant", ""),
        deadline=datetime.fromisoformat(container_labels["medhive.deadline"]),
        state=_STATES.get(state, "other"),
    )


def engine_time(value: str | None) -> datetime | None:
    """A time as Docker reports it (RFC 3339, nanoseconds), or None for its zero time."""
    if not value or value.startswith("0001-"):
        return None
    whole, _, fraction = value.rstrip("Z").partition(".")
    micros = (fraction + "000000")[:6]
    return datetime.fromisoformat(f"{whole}.{micros}+00:00")


class DockerRuntime(OnThisHost):
    """The `Runtime` over the local Docker engine. Never pulls an image."""

    kinds: tuple[str, ...] = ("container",)

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._docker: aiodocker.Docker | None = None

    @property
    def docker(self) -> aiodocker.Docker:
        # Created on first use, inside the running loop (aiohttp sessions need one).
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.settings.docker_url)
        return self._docker

    def _container(self, workload: Workload) -> DockerContainer:
        return self.docker.containers.container(workload.id)

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        name = container_name(self.settings.node_id, run.job_id, run.attempt)
        try:
            container = await self.docker.containers.create(
                container_config(run, self.settings, mounts), name=name
            )
        except aiodocker.DockerError as exc:
            if exc.status == UNREACHABLE:
                raise EngineUnavailable(exc.message) from exc
            if exc.status == 409:  # this attempt's container exists: reuse it
                return await self._inspect(name)
            if exc.status == 404:
                raise ImageMissing(
                    f"image {run.spec.image!r} is not present on node "
                    f"{self.settings.node_id} (medhive does not pull)"
                ) from exc
            raise WorkloadRefused(f"docker refused the container: {exc.message}") from exc
        return workload_from(container.id, "created", labels(run, self.settings.node_id))

    async def _inspect(self, name_or_id: str) -> Workload:
        data = await self.docker.containers.container(name_or_id).show()
        return workload_from(data["Id"], data["State"]["Status"], data["Config"]["Labels"])

    async def start(self, workload: Workload) -> None:
        try:
            await self._container(workload).start()
        except aiodocker.DockerError as exc:
            if exc.status == UNREACHABLE:
                raise EngineUnavailable(exc.message) from exc
            raise WorkloadRefused(f"docker could not start the container: {exc.message}") from exc

    async def started_at(self, workload: Workload) -> datetime | None:
        try:
            info = await self._container(workload).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise WorkloadGone(exc.message) from exc
            raise
        return engine_time(info["State"].get("StartedAt"))

    async def wait(self, workload: Workload) -> ExitInfo:
        container = self._container(workload)
        try:
            await container.wait()
            info = await container.show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise WorkloadGone(exc.message) from exc
            raise
        if info["State"]["Status"] == "removing":  # someone else is removing it
            raise WorkloadGone(f"container {workload.id} is being removed")
        memory = info["HostConfig"].get("Memory") or 0
        return ExitInfo(
            exit_code=int(info["State"]["ExitCode"]),
            oom_killed=bool(info["State"]["OOMKilled"]),
            memory_limit_mb=memory // MIB or None,
            finished_at=engine_time(info["State"].get("FinishedAt")),
        )

    async def stop(self, workload: Workload, grace_s: float) -> None:
        try:
            await self._container(workload).stop(t=math.ceil(grace_s))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def output(self, workload: Workload, limit: int) -> Output:
        """Both streams in one request. (aiodocker's `log` takes a request per stream,
        and inspects the container before each to learn whether it has a TTY, which
        ours never have: three calls to the engine per job that Docker's own `run`
        does not make.)"""
        return await read_logs(self.docker, f"containers/{workload.id}/logs", limit)

    async def expose(self, workload: Workload) -> dict[str, str]:
        return {}  # containers have no network, let alone interactive ports

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        return None  # /outputs is a host directory mounted into the container

    async def remove(self, workload: Workload) -> None:
        try:
            await self._container(workload).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):  # gone, or its removal is under way
                raise

    async def list_own(self) -> list[Workload]:
        wanted = [f"medhive.node={self.settings.node_id}", f"{MANAGED}=1"]
        found = await self.docker.containers.list(all=True, filters=json.dumps({"label": wanted}))
        own = []
        for container in found:
            if container["State"] == "removing":  # reported already, or an operator's doing
                continue
            try:
                own.append(workload_from(container.id, container["State"], container["Labels"]))
            except (KeyError, ValueError, TypeError):  # labelled by hand, not by an agent
                log.warning("container_labels_invalid", container_id=container.id)
        return own

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None
