"""What node agents report: their presence and capacity, and each run's progress."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from shared.messages.base import Payload
from shared.messages.data import StagedFile

RunOutcome = Literal["succeeded", "failed", "timed_out", "cancelled"]


class NodeStatus(Payload):
    """Events `node.online`, `node.heartbeat`, `node.offline`."""

    node_id: str
    cpus: float = Field(description="CPU cores the node offers to jobs.")
    memory_mb: int = Field(description="Memory the node offers to jobs.")
    running: list[str] = Field(default_factory=list, description="Job ids running there.")
    runtimes: list[str] = Field(default_factory=list, description="Workload kinds it runs.")
    heartbeat_s: float = Field(description="Seconds between heartbeats.")
    started_at: AwareDatetime


class RunStarted(Payload):
    """Event `run.started`: the workload of one attempt is running."""

    job_id: str
    attempt: int
    node_id: str
    workload_id: str = Field(description="Container or domain id on the node.")
    started_at: AwareDatetime | None = Field(
        None, description="When it started, as the engine recorded it."
    )


class RunInteractive(Payload):
    """Event `run.interactive`: the guest's interactive ports are forwarded."""

    job_id: str
    attempt: int
    node_id: str
    endpoints: dict[str, str] = Field(description="Port name to host:port on the gateway.")


class RunOutput(Payload):
    """Event `run.output`: what the workload printed (bounded)."""

    job_id: str
    attempt: int
    node_id: str
    stream: Literal["stdout", "stderr"]
    data: str
    truncated: bool = Field(False, description="True when older output was dropped.")


class RunFinished(Payload):
    """Event `run.finished`: the attempt ended on the node."""

    job_id: str
    attempt: int
    node_id: str
    outcome: RunOutcome
    exit_code: int | None = None
    oom_killed: bool = False
    reason: str | None = None
    outputs: list[StagedFile] = Field(
        default_factory=list, description="Result files the node stored in the datacache."
    )
