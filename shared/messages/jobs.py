"""Job descriptions, job commands and job state events."""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from shared.messages.base import Payload
from shared.messages.data import InputSpec, OutputSpec

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class JobState(StrEnum):
    """Where a job is in its life; terminal states never change again."""

    submitted = "submitted"
    queued = "queued"
    staging = "staging"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"
    lost = "lost"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.succeeded, JobState.failed, JobState.timed_out, JobState.cancelled}
)
#: States in which a job holds capacity on a node.
PLACED_STATES = frozenset({JobState.dispatched, JobState.running})


class Resources(Payload):
    """What a job needs of a node; placement reserves exactly this."""

    cpus: float = Field(1.0, gt=0, le=256, description="CPU cores (fractions allowed).")
    memory_mb: int = Field(256, ge=16, le=4 * 1024 * 1024, description="Memory limit in MiB.")
    pids: int = Field(256, ge=8, le=65536, description="Process and thread limit.")


class JobSpec(Payload):
    """What a user asks to run. Published as JSON Schema for other systems."""

    kind: Literal["container"] = Field(
        "container", description="Workload kind; `vm` arrives with the VM runtime."
    )
    name: Name = Field(description="Human-readable job name.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] = Field(
        description="Container image, present on the node (medhive pulls nothing)."
    )
    command: list[str] | None = Field(None, description="Command and arguments (exec form).")
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables.")
    workdir: str | None = Field(None, description="Working directory inside the workload.")
    resources: Resources = Field(default_factory=Resources)
    walltime_s: int = Field(3600, ge=1, le=30 * 86400, description="Maximum run time.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    retries: int = Field(0, ge=0, le=10, description="Times a lost job is queued again.")
    idempotency_key: str | None = Field(
        None, max_length=256, description="Same key, same tenant: the existing job is returned."
    )
    inputs: list[InputSpec] = Field(
        default_factory=list,
        max_length=64,
        description="Data staged by the datacache and mounted read-only before the job runs.",
    )
    outputs: OutputSpec | None = Field(
        None, description="Keep what the job writes to /outputs (absent: nothing is kept)."
    )

    @model_validator(mode="after")
    def _inputs_apart(self) -> JobSpec:
        """Inputs need distinct names and paths that do not nest in one another."""
        names = [item.name for item in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError("input names must be unique")
        paths = sorted(item.path for item in self.inputs)
        for a, b in itertools.pairwise(paths):
            if b == a or b.startswith(a + "/"):
                raise ValueError(f"input paths {a} and {b} overlap")
        return self

    @property
    def needs_data(self) -> bool:
        """Whether the job's node needs a datacache grant (inputs to read, results to keep)."""
        return bool(self.inputs) or self.outputs is not None


class JobSubmit(Payload):
    """Command `job.submit`: run this job for the sender's tenant."""

    spec: JobSpec


class JobCancel(Payload):
    """Command `job.cancel`."""

    job_id: str
    reason: str = Field("cancelled by user", max_length=500)


class JobEvent(Payload):
    """Event `job.<state>`: the job entered `state` (stored before it is published)."""

    job_id: str
    state: JobState
    previous_state: JobState | None = None
    reason: str | None = None
    attempt: int = 0
    node_id: str | None = None
    exit_code: int | None = None


class NodeRun(Payload):
    """Command `node.run` (routing key `node.<node_id>.run`): start this attempt.

    For a job with inputs or outputs it is sent only once the datacache has granted
    this node access, so the node can fetch the inputs at once.
    """

    job_id: str
    attempt: int
    tenant: str
    spec: JobSpec
    deadline: AwareDatetime = Field(description="Walltime end; the node stops the job then.")


class NodeCancel(Payload):
    """Command `node.cancel` (routing key `node.<node_id>.cancel`)."""

    job_id: str
    attempt: int
    reason: str
