"""What the job API reads from a query string and answers with, as pydantic models:
the handlers parse with them and the OpenAPI document is built from them."""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.scheduler.tenants import Quota
from services.scheduler.webhooks import EventName
from shared.identity import NAME_PATTERN
from shared.messages.jobs import JobSpec, JobState


class Me(BaseModel):
    """Who a token is, for a client that shows it (the console)."""

    name: str = Field(description="The token's name.")
    tenant: str
    role: str = Field(description="`user` or `operator`.")


class JobsQuery(BaseModel):
    """`GET /v1/jobs`: the caller's tenant's jobs, newest first."""

    state: JobState | None = Field(None, description="Only jobs in this state.")
    name: str | None = Field(
        None, min_length=1, max_length=200, description="Only jobs whose name starts so."
    )
    tenant: str | None = Field(
        None,
        pattern=rf"^(\*|{NAME_PATTERN[1:-1]})$",
        description="Operators: this tenant's jobs, or `*` for every tenant's (default: the "
        "caller's own). A user may name only its own tenant.",
    )
    limit: int = Field(50, ge=1, le=500, description="Jobs per page.")
    before: str | None = Field(
        None,
        pattern=r"^j-[0-9a-f]{20}$",
        description="Jobs older than this job id (`next_before` of a page).",
    )


class LogsQuery(BaseModel):
    attempt: int | None = Field(None, ge=0, le=100, description="Attempt; default the last.")


class JobSummary(BaseModel):
    """A job as its tenant sees it in a listing: everything but its history."""

    model_config = ConfigDict(extra="allow")

    id: str
    tenant: str
    name: str
    spec: JobSpec
    state: JobState
    attempt: int
    node_id: str | None
    created_at: AwareDatetime
    updated_at: AwareDatetime


class JobView(JobSummary):
    """A job as its tenant sees it."""

    history: list[dict[str, Any]] = Field(description="Every state it was in, with when and why.")
    waiting_for: str | None = Field(
        None,
        description="While it waits (queued, staging): why it is not placed yet (its inputs, "
        "its tenant's quota, no node with room, no node that could ever run it, its turn).",
    )


#: Most jobs one `POST /v1/jobs/batch` may carry (the body's size limit holds too).
MAX_BATCH_JOBS = 100


class JobBatch(BaseModel):
    """`POST /v1/jobs/batch`: many jobs at once, for systems that submit in bulk."""

    jobs: list[JobSpec] = Field(
        min_length=1,
        max_length=MAX_BATCH_JOBS,
        description="The jobs; one that is not valid refuses the whole batch (422).",
    )


class BatchAnswer(BaseModel):
    """What `POST /v1/jobs` would have answered for one job of the batch."""

    status: int = Field(
        description="201 made, 200 repeated (idempotency key), 409 conflict, 429 the "
        "tenant's queued-jobs quota is reached."
    )
    job: JobView | None = Field(description="The job made or repeated; none on a conflict.")
    detail: str | None = Field(None, description="Why not, on a conflict or a refusal.")


class BatchAnswers(BaseModel):
    results: list[BatchAnswer] = Field(description="One per job, in the order sent.")


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_before: str | None = Field(description="Pass as `before` for the next page.")


class Logs(BaseModel):
    job_id: str
    attempt: int
    state: JobState
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool


class ResultFile(BaseModel):
    path: str
    sha256: str
    size: int


class Outputs(BaseModel):
    job_id: str
    state: JobState
    files: list[ResultFile]
    bytes: int
    upload: dict[str, Any] | None = Field(description="How sending them on went, if asked.")


class NodeView(BaseModel):
    id: str
    online: bool
    cpus: float
    memory_mb: int
    free_cpus: float
    free_memory_mb: int
    runtimes: list[str]
    last_seen: AwareDatetime = Field(description="Its last heartbeat.")
    running_jobs: int = Field(description="Jobs placed on it now, every tenant's.")
    job_ids: list[str] = Field(
        description="Those of them the caller may read (an operator: all of them)."
    )


class Nodes(BaseModel):
    nodes: list[NodeView]


class TenantView(BaseModel):
    tenant: str
    share: float
    quota: Quota
    usage_cpu_s: float = Field(description="Decayed usage, cpu-equivalent seconds.")
    load: float = Field(description="Fair-share load; the lowest goes first.")
    running_cpus: float
    running_memory_mb: int
    running_jobs: int
    queued_jobs: int = Field(description="Jobs not placed yet (queued or staging).")


class Tenants(BaseModel):
    tenants: list[TenantView]
    half_life_s: float = Field(description="Half-life of usage (README, fair share).")


class WebhookCreate(BaseModel):
    """`POST /v1/webhooks`: where to send which of the tenant's job events."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        max_length=2048,
        json_schema_extra={"format": "uri"},
        description="Where deliveries are POSTed: https:// on a host with public addresses "
        "only (an operator may allow hosts inside the site, over http:// too).",
    )
    events: list[EventName] = Field(
        min_length=1,
        max_length=32,
        description="The job events to send (`job.*`: every one).",
    )


class WebhookView(BaseModel):
    """A registered webhook, as its tenant sees it (never its secret)."""

    id: str
    url: str
    events: list[str]
    created_at: AwareDatetime
    created_by: str | None = Field(description="The token that registered it.")


class WebhookCreated(WebhookView):
    """A webhook just registered, with the secret its deliveries are signed with."""

    secret: str = Field(
        description="`whsec_...`: verify each delivery's `webhook-signature` with it. "
        "Shown this once: keep it."
    )


class WebhookList(BaseModel):
    webhooks: list[WebhookView]


class WebhookTestQueued(BaseModel):
    webhook_id: str
    delivery_id: str = Field(description="The test message's `webhook-id` header.")
