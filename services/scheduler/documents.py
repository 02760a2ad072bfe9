"""The documents the scheduler stores, as they are stored: its jobs (with their history
and outbox entries), nodes, job output and tenants.

TypedDicts rather than models: a job is read, decided on and written several times a
second per job, from the store's copies in memory (store.py), and a TypedDict is the
plain dict pymongo returns and takes, so typing it costs nothing at run time (no
conversion, no validation, no copy), while mypy checks every field read and written
by name and type. pymongo's collections stay untyped (`shared.mongo.Document`): the
store casts what a read returns to these shapes once, in its read functions, and
update specs (`$set` fields, dotted paths included) stay plain dicts.

A field is required when every write of the document sets it; `NotRequired` marks what
a later write adds, what some reads leave out (projections), and what older versions
stored differently. What comes from a pydantic model is its `model_dump(mode="json")`:
the model, not these shapes, is its schema wherever the whole of it is read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

from bson import ObjectId

# -- jobs -------------------------------------------------------------------------------


class JobCommand(TypedDict):
    """The message (or HTTP request) that asked for the job, and who sent it."""

    id: str
    sender: str  # the AMQP user (proven by RabbitMQ), or the API token's name


class ResourcesDocument(TypedDict):
    """`Resources` of a job's spec: what placement reserves for it."""

    cpus: float
    memory_mb: int
    pids: int


class JobSpecDocument(TypedDict):
    """`JobSpec` as stored; the parts placement reads by key are typed, the rest are
    read whole through `JobSpec.model_validate`."""

    kind: Literal["container", "vm"]
    name: str
    labels: dict[str, str]
    image: str
    vm: dict[str, Any] | None  # VmSpec
    command: list[str] | None
    env: dict[str, str]
    workdir: str | None
    resources: ResourcesDocument
    walltime_s: int
    priority: int
    retries: int
    idempotency_key: str | None
    inputs: list[dict[str, Any]]  # InputSpec
    outputs: dict[str, Any] | None  # OutputSpec


class HistoryNote(TypedDict):
    """What a caller notes in a job's history without changing its state
    (`JobService.annotate` adds the state and the time)."""

    event: str
    reason: str


class HistoryEntry(TypedDict):
    """One step of a job's life: a state it entered, or a note (`event`) in a state."""

    state: str
    at: datetime
    reason: str | None
    event: NotRequired[str]  # a note, not a move
    # Of the fields the move set, those an entry repeats:
    attempt: NotRequired[int]
    node_id: NotRequired[str | None]
    exit_code: NotRequired[int | None]


class OutboxEntry(TypedDict):
    """A message a job's write stored for the relay to publish (store.outbox_entry)."""

    id: str
    node: str | None  # the node a node command goes to
    body: NotRequired[bytes]  # the message's JSON, as published
    envelope: NotRequired[dict[str, Any]]  # instead of `body`, as older versions stored it


class StagingProgress(TypedDict):
    """How far the datacache got staging the job's inputs (`data.progress`, then
    `data.staged` sets `done`: alone if no progress came before it)."""

    input: NotRequired[str]
    files: NotRequired[int]
    bytes: NotRequired[int]
    done: bool


class StagedInputDocument(TypedDict):
    """`StagedInput`: an input as the datacache holds it for the job."""

    name: str
    path: str
    source: str
    version: str | None
    files: int
    bytes: int


class OutputFile(TypedDict):
    """`StagedFile`: one result file, its path under /outputs."""

    path: str
    sha256: str
    size: int


class JobOutputs(TypedDict):
    """The job's results, as the node's `run.finished` or the datacache's
    `data.outputs` listed them."""

    attempt: int
    files: list[OutputFile]
    bytes: int


class OutputsUpload(TypedDict):
    """How sending the results on to their destination went (`data.uploaded`)."""

    destination: str
    ok: bool
    detail: str


class JobHead(TypedDict):
    """The fields of a job its messages name: all a job has before it is stored
    (`JobService.submit` builds its first events from them)."""

    _id: str
    tenant: str
    actor: str | None
    attempt: int
    node_id: str | None
    command: JobCommand
    exit_code: NotRequired[int | None]  # once it ended on a node


class JobDocument(JobHead):
    """A job in the `jobs` collection (`JobStore.insert_job` writes it, `JobStore.apply`
    changes it)."""

    name: str
    spec: JobSpecDocument
    priority: int
    state: str  # a JobState's value
    created_at: datetime
    updated_at: datetime
    # The store's own (store.INTERNAL_FIELDS): revision guard, write token.
    rev: int
    w: NotRequired[str]  # the token of the last tracked update (commit.py)
    idempotency_key: NotRequired[str]
    # Left out by reads that do not need them (`get`, `page`, `placeable`).
    history: NotRequired[list[HistoryEntry]]
    outbox: NotRequired[list[OutboxEntry]]
    outbox_at: NotRequired[datetime]  # while the outbox may hold messages
    # Set by a dispatch:
    deadline: NotRequired[datetime]
    grant_pending: NotRequired[bool]  # waiting for the datacache's grant to send node.run
    # Set while it runs, or as it ends:
    cancel_requested: NotRequired[str]  # the reason, sent to its node
    walltime_enforced_at: NotRequired[datetime]
    interactive: NotRequired[dict[str, str]]  # port name -> host:port on the gateway
    reason: NotRequired[str | None]
    oom_killed: NotRequired[bool]
    # What the datacache reports:
    inputs_staged: NotRequired[bool]
    staged_inputs: NotRequired[list[StagedInputDocument]]
    staging_progress: NotRequired[StagingProgress]
    outputs: NotRequired[JobOutputs]
    outputs_upload: NotRequired[OutputsUpload]


class JobOutbox(TypedDict):
    """A job read for its outbox alone (what the relay's sweeps read)."""

    _id: str
    outbox: list[OutboxEntry]


# -- the other collections ----------------------------------------------------------------


class NodeDocument(TypedDict):
    """A node in the `nodes` collection: its last `NodeStatus`, and whether it is online."""

    _id: str
    node_id: str
    cpus: float
    memory_mb: int
    running: list[str]
    runtimes: list[str]
    heartbeat_s: float
    started_at: datetime
    online: bool
    last_seen: datetime


class OutputDocument(TypedDict):
    """The end of one output stream of one attempt of a job (`output` collection)."""

    _id: ObjectId
    job_id: str
    attempt: int
    stream: str
    data: str
    truncated: bool


class TenantDocument(TypedDict):
    """A tenant in the `tenants` collection: what an operator set, and its usage."""

    _id: str
    policy: NotRequired[dict[str, Any]]  # TenantPolicy
    usage: NotRequired[float]  # decayed cpu-equivalent seconds as of `usage_at`
    usage_at: NotRequired[datetime]
