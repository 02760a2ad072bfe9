"""Workload runtimes of the node agent: one `Runtime` protocol, one module per engine."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.vmnode.guestnet import GuestNetwork
from services.vmnode.runtimes.base import (
    EngineUnavailable,
    ExitInfo,
    ImageMissing,
    Mount,
    Output,
    Runtime,
    Workload,
    WorkloadGone,
    WorkloadRefused,
)
from services.vmnode.settings import NodeSettings
from shared.messages.data import StagedFile
from shared.messages.jobs import NodeRun


class ByKind:
    """One `Runtime` over several: each job goes to the runtime of its kind."""

    def __init__(self, runtimes: Sequence[Runtime]) -> None:
        self.runtimes = list(runtimes)
        self._of = {kind: runtime for runtime in runtimes for kind in runtime.kinds}
        self.kinds = tuple(self._of)

    def _for(self, workload: Workload) -> Runtime:
        return self._of[workload.kind]

    async def capacity(self) -> tuple[float, int] | None:
        """The first runtime's that knows better than the settings (a Swarm's), if any."""
        for runtime in self.runtimes:
            if (offered := await runtime.capacity()) is not None:
                return offered
        return None

    def brings_data(self, run: NodeRun) -> bool:
        runtime = self._of.get(run.spec.kind)
        return runtime is not None and runtime.brings_data(run)

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        runtime = self._of.get(run.spec.kind)
        if runtime is None:
            raise WorkloadRefused(f"this node does not run {run.spec.kind} jobs")
        return await runtime.prepare(run, mounts)

    async def start(self, workload: Workload) -> None:
        await self._for(workload).start(workload)

    async def started_at(self, workload: Workload) -> datetime | None:
        return await self._for(workload).started_at(workload)

    async def wait(self, workload: Workload) -> ExitInfo:
        return await self._for(workload).wait(workload)

    async def stop(self, workload: Workload, grace_s: float) -> None:
        await self._for(workload).stop(workload, grace_s)

    async def output(self, workload: Workload, limit: int) -> Output:
        return await self._for(workload).output(workload, limit)

    async def expose(self, workload: Workload) -> dict[str, str]:
        return await self._for(workload).expose(workload)

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        await self._for(workload).export_outputs(workload, into)

    async def stored_outputs(self, workload: Workload) -> list[StagedFile] | None:
        return await self._for(workload).stored_outputs(workload)

    async def remove(self, workload: Workload) -> None:
        await self._for(workload).remove(workload)

    async def list_own(self) -> list[Workload]:
        return [w for runtime in self.runtimes for w in await runtime.list_own()]

    async def close(self) -> None:
        for runtime in self.runtimes:
            await runtime.close()


def create_runtime(settings: NodeSettings, network: GuestNetwork | None = None) -> Runtime:
    """The runtimes the settings name; they open no connection until first used.

    Containers run in Docker, as Swarm services, or in the benchmark's instant runtime;
    VMs in libvirt when `libvirt_uri` is set.
    """
    runtimes: list[Runtime] = []
    if settings.runtime == "instant":
        from services.vmnode.runtimes.instant import InstantRuntime

        runtimes.append(InstantRuntime(settings))
    elif settings.runtime == "swarm":
        from services.vmnode.runtimes.swarm import SwarmRuntime

        runtimes.append(SwarmRuntime(settings))
    else:
        from services.vmnode.runtimes.docker import DockerRuntime

        runtimes.append(DockerRuntime(settings))
    if settings.libvirt_uri is not None:
        from services.vmnode.runtimes.libvirt import LibvirtRuntime

        runtimes.append(LibvirtRuntime(settings, network))
    return runtimes[0] if len(runtimes) == 1 else ByKind(runtimes)


__all__ = [
    "ByKind",
    "EngineUnavailable",
    "ExitInfo",
    "ImageMissing",
    "Output",
    "Runtime",
    "Workload",
    "WorkloadGone",
    "WorkloadRefused",
    "create_runtime",
]
