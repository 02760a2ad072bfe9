"""What the audit API reads from a query string and answers with, as pydantic models:
the handlers parse with them and the OpenAPI document is built from them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

MAX_SEQ = 2**62
MAX_LIMIT = 1000


class EventFilters(BaseModel):
    """Which records: all of them match every filter given."""

    job: str | None = Field(None, max_length=256, description="Records of this job.")
    tenant: str | None = Field(
        None, max_length=64, description="Records of this tenant (operators; a user's own)."
    )
    type: str | None = Field(None, max_length=128, description="Type prefix, e.g. `job.`.")
    # Strings, parsed by the handler: a time without a zone is UTC, and an unencoded
    # `+` arrives as a space; the document still says which strings are times.
    since: str | None = Field(
        None,
        max_length=64,
        description="ISO 8601 time, inclusive; UTC when it has no zone.",
        json_schema_extra={"format": "date-time"},
    )
    until: str | None = Field(
        None,
        max_length=64,
        description="ISO 8601 time, exclusive.",
        json_schema_extra={"format": "date-time"},
    )
    after: int = Field(0, ge=0, le=MAX_SEQ, description="Records after this `seq`.")


class EventsQuery(EventFilters):
    limit: int = Field(100, ge=1, le=MAX_LIMIT, description="Records per page.")


class EventsPage(BaseModel):
    events: list[dict[str, Any]] = Field(description="Records in `seq` order.")
    next_after: int | None = Field(description="Pass as `after` for the next page.")


class EventsHead(BaseModel):
    seq: int = Field(
        description="The newest stored record's `seq`: a live view that starts after it "
        "shows only what comes next."
    )


class ChainVerdict(BaseModel):
    ok: bool
    records: int
    first_bad_seq: int | None
    problem: str | None
    last_seq: int
    last_hash: str
