"""The benchmark runtime: every workload ends at once with exit 0, Docker untouched.

It measures the agent and the messaging around it without the engine's cost. It
is used only when `MEDHIVE_VMNODE_RUNTIME=instant` is set explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from services.vmnode.runtimes.base import ExitInfo, Mount, OnThisHost, Output, Workload
from services.vmnode.settings import NodeSettings
from shared.messages.jobs import NodeRun


class InstantRuntime(OnThisHost):
    """A `Runtime` whose workloads exist only in name."""

    kinds: tuple[str, ...] = ("container",)

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        return Workload(
            id=f"instant-{run.job_id}-{run.attempt}",
            job_id=run.job_id,
            attempt=run.attempt,
            tenant=run.tenant,
            deadline=run.deadline,
            state="created",
        )

    async def start(self, workload: Workload) -> None:
        return None

    async def started_at(self, workload: Workload) -> datetime | None:
        return None  # nothing runs, and nothing is adopted: the agent's clock will do

    async def wait(self, workload: Workload) -> ExitInfo:
        return ExitInfo(exit_code=0, oom_killed=False)

    async def stop(self, workload: Workload, grace_s: float) -> None:
        return None

    async def output(self, workload: Workload, limit: int) -> Output:
        return Output("", "")

    async def expose(self, workload: Workload) -> dict[str, str]:
        return {}  # containers have no network, let alone interactive ports

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        return None  # /outputs is a host directory mounted into the container

    async def remove(self, workload: Workload) -> None:
        return None

    async def list_own(self) -> list[Workload]:
        return []

    async def close(self) -> None:
        return None
