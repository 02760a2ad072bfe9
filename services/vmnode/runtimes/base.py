"""The interface between the node agent and a workload engine.

The agent only ever talks to a `Runtime`: Docker (runtimes/docker.py), Docker Swarm
(runtimes/swarm.py), libvirt (runtimes/libvirt.py) and the benchmark runtime
(runtimes/instant.py) implement it, and
`ByKind` (runtimes/__init__.py) sends each job to the one for its kind. Every method is
a coroutine that never blocks the loop. A workload's identity (job, attempt, tenant,
deadline) lives in the engine itself (container labels, domain metadata), so a
restarted agent can find and adopt what its predecessor started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from shared.messages.data import StagedFile
from shared.messages.jobs import NodeRun

State = Literal["created", "running", "exited", "other"]


@dataclass(frozen=True)
class Workload:
    """A handle on one attempt's workload, as the engine reports it."""

    id: str
    job_id: str
    attempt: int
    tenant: str
    deadline: datetime
    state: State
    kind: str = "container"

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.attempt)


@dataclass(frozen=True)
class Mount:
    """A host directory the workload sees at `target` (inputs read-only, /outputs not)."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ExitInfo:
    """How a workload ended."""

    #: None when it is not known (a Swarm task stopped on another node goes with it).
    exit_code: int | None
    oom_killed: bool
    memory_limit_mb: int | None = None
    #: When it ended, as the engine recorded it (the same on every read), if known.
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Output:
    """What a workload printed, each stream cut to its last bytes."""

    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False


class ImageMissing(Exception):
    """The job's image is not on this node; medhive never pulls one."""


class WorkloadGone(Exception):
    """The workload no longer exists in the engine (removed outside medhive)."""


class EngineUnavailable(Exception):
    """The engine did not answer (daemon down or restarting): try again later."""


class WorkloadRefused(Exception):
    """The engine refused to create or start the workload (bad command, workdir, ...)."""


class OnThisHost:
    """What a runtime whose workloads run on the agent's own host says of them: the
    agent places their data and collects their results (jobdata.py), and its settings
    say the capacity. Docker, libvirt and the benchmark runtime are such runtimes."""

    def brings_data(self, run: NodeRun) -> bool:
        return False

    async def capacity(self) -> tuple[float, int] | None:
        return None

    async def stored_outputs(self, workload: Workload) -> list[StagedFile] | None:
        return None


class Runtime(Protocol):
    """What the node agent needs of a workload engine."""

    #: The job kinds it runs (announced in heartbeats, so only fitting jobs come here).
    kinds: tuple[str, ...]

    def brings_data(self, run: NodeRun) -> bool:
        """Whether this runtime brings the job's inputs to where it runs, and its
        results back, itself (Swarm tasks on other nodes); if not, the agent places
        them on this host (jobdata.py) and hands the runtime their `mounts`."""

    async def capacity(self) -> tuple[float, int] | None:
        """(cpus, memory MiB) the engine offers to jobs, where it knows better than the
        agent's settings (the Swarm nodes that run its jobs); None: the settings say."""

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        """Create the workload of `run` with `mounts`, or return the one that already exists.

        Raises `ImageMissing` or `WorkloadRefused` when it cannot be created.
        """

    async def start(self, workload: Workload) -> None:
        """Start a created workload; raises `WorkloadRefused` when it cannot start."""

    async def started_at(self, workload: Workload) -> datetime | None:
        """When the workload started, as the engine recorded it: the same on every
        read, so a repeated announcement says exactly what the first one said."""

    async def wait(self, workload: Workload) -> ExitInfo:
        """Wait until the workload has exited; `WorkloadGone` if it no longer exists."""

    async def stop(self, workload: Workload, grace_s: float) -> None:
        """SIGTERM, then kill after `grace_s`; returns once it has stopped."""

    async def output(self, workload: Workload, limit: int) -> Output:
        """Stdout and stderr, each the last `limit` bytes at most; may raise `WorkloadGone`."""

    async def expose(self, workload: Workload) -> dict[str, str]:
        """Make the workload's interactive ports reachable once it answers on them;
        name -> host:port. Workloads without interactive ports return {} at once."""

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        """Put the results of an exited workload into `into`, where the agent collects
        them (nothing to do where `/outputs` is a host directory already)."""

    async def stored_outputs(self, workload: Workload) -> list[StagedFile] | None:
        """The results the runtime stored in the datacache itself (where it brings the
        data, see `brings_data`); None where the agent collects them from this host."""

    async def remove(self, workload: Workload) -> None:
        """Delete the workload and what it printed; a missing one is not an error."""

    async def list_own(self) -> list[Workload]:
        """Every workload of this node, whatever its state."""

    async def close(self) -> None:
        """Release the engine connection; workloads keep running."""


def keep_tail(text: str, limit: int) -> tuple[str, bool]:
    """The last `limit` bytes of `text` (UTF-8) and whether anything was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    # A cut inside a multi-byte character drops that character's remaining bytes.
    return raw[-limit:].decode("utf-8", "ignore"), True
