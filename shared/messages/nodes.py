"""What node agents report: their presence and capacity, and each run's progress."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field

from shared.messages.base import Payload
from shared.messages.data import StagedFile

RunOutcome = Literal["succeeded", "failed", "timed_out", "cancelled"]


class NodeStatus(Payload):
    """Events `node.online`, `node.heartbeat`, `node.offline`."""

    node_id: str = Field(description="The node's name; its commands' routing keys carry it.")
    cpus: float = Field(description="CPU cores the node offers to jobs.")
    memory_mb: int = Field(description="Memory the node offers to jobs, in MiB.")
    running: list[str] = Field(default_factory=list, description="Job ids running there.")
    runtimes: list[str] = Field(default_factory=list, description="Workload kinds it runs.")
    heartbeat_s: float = Field(description="Seconds between heartbeats.")
    started_at: AwareDatetime = Field(description="When the node agent started.")


class RunStarted(Payload):
    """Event `run.started`: the workload of one attempt is running."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt, counted from 1.")
    node_id: str = Field(description="The node agent running it.")
    workload_id: str = Field(description="Container or domain id on the node.")
    started_at: AwareDatetime | None = Field(
        None, description="When it started, as the engine recorded it; absent if unknown."
    )


class RunInteractive(Payload):
    """Event `run.interactive`: the guest's interactive ports are forwarded."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt, counted from 1.")
    node_id: str = Field(description="The node agent running the guest.")
    endpoints: dict[str, str] = Field(description="Port name to host:port on the gateway.")


class RunOutput(Payload):
    """Event `run.output`: what the workload printed (bounded)."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt, counted from 1.")
    node_id: str = Field(description="The node agent that ran it.")
    stream: Literal["stdout", "stderr"] = Field(description="Which output stream it is.")
    data: str = Field(description="What the workload wrote to the stream; its end, if long.")
    truncated: bool = Field(False, description="True when older output was dropped.")


class RunFinished(Payload):
    """Event `run.finished`: the attempt ended on the node."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt, counted from 1.")
    node_id: str = Field(description="The node agent that ran it.")
    outcome: RunOutcome = Field(description="How it ended.")
    exit_code: int | None = Field(
        None,
        description="The workload's exit code (a VM: 0 when the guest powered off, 1 when it "
        "crashed, 137 when it was forced off); absent if it never started or is not known.",
    )
    oom_killed: bool = Field(
        False, description="True when the kernel's out-of-memory killer struck in it."
    )
    reason: str | None = Field(None, description="Why it ended so, in words; absent if none.")
    outputs: list[StagedFile] = Field(
        default_factory=list, description="Result files the node stored in the datacache."
    )
