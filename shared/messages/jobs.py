"""Job descriptions, job commands and job state events."""

from __future__ import annotations

import itertools
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from shared.envelope import derived_id
from shared.messages.base import Payload
from shared.messages.data import InputSpec, OutputSpec
from shared.messages.net import Port, PortName

Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]

# Bounds of the free-form parts of a job. Each is far above what a real job needs; they
# exist so that one message cannot carry megabytes into every copy of a job (the store,
# its events, the node's command) and so that the error names the field. No text may
# hold a NUL: neither an exec argument, an environment variable nor a stored key can.
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
LabelValue = Annotated[str, StringConstraints(max_length=1024, pattern=r"^[^\x00]*$")]
EnvName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^=\x00]+$")]
EnvValue = Annotated[str, StringConstraints(max_length=8192, pattern=r"^[^\x00]*$")]
Argument = Annotated[str, StringConstraints(max_length=8192, pattern=r"^[^\x00]*$")]
MAX_LABELS = 64
MAX_ENV = 128
MAX_ARGUMENTS = 256


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

    cpus: float = Field(
        1.0,
        ge=0.01,
        le=256,
        description="CPU cores (fractions down to 0.01, the least a container's limit can be).",
    )
    memory_mb: int = Field(256, ge=16, le=4 * 1024 * 1024, description="Memory limit in MiB.")
    pids: int = Field(256, ge=8, le=65536, description="Process and thread limit.")


HostPath = Annotated[str, StringConstraints(min_length=2, max_length=1024, pattern=r"^/[^\x00]*$")]
WorkPath = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^/[^\x00]*$")]


class InteractivePort(Payload):
    """A guest port a user reaches through the network gateway while the job runs."""

    name: PortName = Field(description="What the port is for: rdp, ssh, ...")
    port: Port = Field(description="The TCP port the guest serves.")


class VmSpec(Payload):
    """How a `vm` job's guest boots and receives its data."""

    kernel: HostPath | None = Field(None, description="Kernel on the node, for direct boot.")
    initrd: HostPath | None = Field(None, description="Initial ramdisk, with `kernel`.")
    cmdline: str | None = Field(None, max_length=2048, description="Kernel command line.")
    os: Literal["linux", "windows"] = Field("linux", description="Guest operating system.")
    data_method: Literal["iso", "disk"] = Field(
        "iso",
        description="`iso`: inputs on a read-only CD-ROM, results on a writable disk; "
        "`disk`: inputs and results on one writable disk.",
    )
    disk_size_mb: int = Field(
        64, ge=1, le=1024 * 1024, description="Size of the writable disk in MiB."
    )
    filesystem: Literal["ext4", "fat32"] = Field("ext4", description="The writable disk's.")
    interactive: list[InteractivePort] = Field(
        default_factory=list, max_length=8, description="Ports forwarded while the job runs."
    )

    @model_validator(mode="after")
    def _consistent(self) -> VmSpec:
        if self.initrd is not None and self.kernel is None:
            raise ValueError("an initrd needs a kernel")
        if self.cmdline is not None and self.kernel is None:
            raise ValueError("a cmdline needs a kernel (direct boot)")
        if self.filesystem == "fat32" and self.disk_size_mb < 33:
            raise ValueError("a FAT32 disk needs at least 33 MiB")
        names = [p.name for p in self.interactive]
        if len(set(names)) != len(names):
            raise ValueError("interactive port names must be unique")
        return self


class JobSpec(Payload):
    """What a user asks to run. Published as JSON Schema for other systems."""

    kind: Literal["container", "vm"] = Field("container", description="Workload kind.")
    name: Name = Field(description="Human-readable job name.")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Free-form labels."
    )
    image: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="Container image present on the node (medhive pulls nothing), or for "
        "a VM the path of a qcow2 base image on the node (never written: each job runs "
        "on an overlay).",
    )
    vm: VmSpec | None = Field(None, description="Guest settings of a `vm` job.")
    command: list[Argument] | None = Field(
        None, max_length=MAX_ARGUMENTS, description="Command and arguments (exec form)."
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict, max_length=MAX_ENV, description="Environment variables."
    )
    workdir: WorkPath | None = Field(
        None, description="Working directory inside the workload (absolute)."
    )
    resources: Resources = Field(
        default_factory=Resources, description="CPUs, memory and processes the job needs."
    )
    walltime_s: int = Field(
        3600, ge=1, le=30 * 86400, description="Maximum run time in seconds; then it is stopped."
    )
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
    def _kind_fields(self) -> JobSpec:
        """Container fields make no sense for a VM, nor guest settings for a container."""
        if self.kind == "container":
            if self.vm is not None:
                raise ValueError("`vm` settings need `kind: vm`")
            return self
        used = [f for f in ("command", "workdir") if getattr(self, f) is not None]
        used += ["env"] if self.env else []
        if used:
            raise ValueError(f"{', '.join(used)} apply to containers only")
        if not self.image.startswith("/"):
            raise ValueError("a VM's image is the absolute path of a qcow2 file on the node")
        return self

    @model_validator(mode="before")
    @classmethod
    def _vm_defaults(cls, data: object) -> object:
        """A `vm` job without a `vm` section gets the default guest settings."""
        if isinstance(data, dict) and data.get("kind") == "vm" and data.get("vm") is None:
            return {**data, "vm": {}}
        return data

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

    spec: JobSpec = Field(description="The job to run.")


class JobCancel(Payload):
    """Command `job.cancel`."""

    job_id: str = Field(max_length=64, description="The job to cancel, of the sender's tenant.")
    reason: str = Field(
        "cancelled by user",
        max_length=500,
        description="Why; it becomes the reason of the job's `job.cancelled` event.",
    )


class JobDuplicate(Payload):
    """Event `job.duplicate`: a `job.submit` repeated an earlier one, so no new job was
    made; this names the job the first one made."""

    job_id: str = Field(description="The job the earlier submission made.")
    state: JobState = Field(description="Where that job is now.")
    matched_by: Literal["message_id", "idempotency_key"] = Field(
        description="What made it a repeat: the same envelope `id` from the same sender, "
        "or the same `idempotency_key` in the same tenant."
    )


class JobEvent(Payload):
    """Event `job.<state>`: the job entered `state` (stored before it is published)."""

    job_id: str = Field(description="The job's id.")
    state: JobState = Field(description="The state the job entered.")
    previous_state: JobState | None = Field(
        None, description="The state it left (absent for `submitted`, its first)."
    )
    reason: str | None = Field(
        None, description="Why it moved, in words (e.g. `placed on node-1`); absent if none."
    )
    attempt: int = Field(
        0, description="Its latest attempt on a node, counted from 1; 0 until first placed."
    )
    node_id: str | None = Field(
        None, description="The node of its latest attempt; absent until first placed."
    )
    exit_code: int | None = Field(
        None,
        description="The workload's exit code, in a final state only; absent when it never "
        "ran or its exit is not known.",
    )


class JobInteractive(Payload):
    """Event `job.interactive_ready`: the guest answers; where a user connects to it."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt whose guest answers (counted from 1).")
    endpoints: dict[str, str] = Field(description="Port name to host:port on the gateway.")


class NodeRun(Payload):
    """Command `node.run` (routing key `node.<node_id>.run`): start this attempt.

    For a job with inputs or outputs it is sent only once the datacache has granted
    this node access, so the node can fetch the inputs at once.
    """

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="Which attempt of the job this is, counted from 1.")
    tenant: str = Field(description="The job's tenant; the node's reports about it carry it.")
    spec: JobSpec = Field(description="The job as it was submitted.")
    deadline: AwareDatetime = Field(description="Walltime end; the node stops the job then.")


def run_command_id(job_id: str, attempt: int) -> uuid.UUID:
    """The id of the one `node.run` of an attempt; what the node's reports about the
    attempt name as their cause, even from an agent that restarted and never saw it."""
    return derived_id("node.run", job_id, attempt)


class NodeCancel(Payload):
    """Command `node.cancel` (routing key `node.<node_id>.cancel`)."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt to stop; any other attempt is left alone.")
    reason: str = Field(description="Why; the run's `run.finished` reports it.")
