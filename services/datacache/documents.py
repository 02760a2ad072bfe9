"""The documents the datacache stores, in the shape `store.py` writes them: objects,
stagings, grants and results (see `store.py` for what each collection is for).

These are the stored shapes themselves, so mypy checks every read and write of a field.
They are `TypedDict`s rather than classes because a TypedDict is the very dict pymongo
hands back and takes in: nothing is converted on the way in or out, which matters for
the grant and object looked up on every read of a study's thousands of objects.
Fields written later by a `$set` (a staging's outcome, a grant's delegates) are
`NotRequired`: a document lacks them until then.

`sources` and `uploads` are read in one place each and stay plain documents.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, NotRequired, TypedDict

#: How far a staging got; `released` once its job ended (its objects are unpinned).
StagingState = Literal["staging", "staged", "failed", "released"]

#: The deadlines of a grant: reading the job's inputs, storing its results.
Deadline = Literal["expires_at", "upload_until"]


class FileEntry(TypedDict):
    """One file of a fetched input: its path under the input's directory, its object."""

    path: str
    sha256: str
    size: int


class ManifestEntry(TypedDict):
    """One staged input of a job, as its node reads it: where it goes, and its files."""

    name: str
    path: str
    files: list[FileEntry]


class ObjectDoc(TypedDict):
    """One distinct plaintext, held encrypted in blob `blob` (`objects`)."""

    _id: str  # the plaintext's SHA-256
    blob: str
    size: int
    tenants: list[str]
    created_at: datetime
    last_access: datetime
    quarantined: bool


class StagingDoc(TypedDict):
    """A job's staging: its inputs, how far it got, the objects it pins (`stagings`)."""

    _id: str  # the job's id
    tenant: str
    actor: str | None
    inputs: list[dict[str, Any]]  # each an `InputSpec`, as JSON
    state: StagingState
    staged: list[dict[str, Any]]  # each a `StagedInput`, as JSON, once staged
    objects: list[str]
    announced: bool
    created_at: datetime
    finished_at: NotRequired[datetime]
    # Once staged:
    manifest: NotRequired[list[ManifestEntry]]
    cached: NotRequired[int]
    # Once failed:
    reason: NotRequired[str]
    failed_source: NotRequired[str]
    # Once its job ended:
    released_at: NotRequired[datetime]


class GrantDoc(TypedDict):
    """Which node may read which objects of a job attempt, until when (`grants`)."""

    _id: str  # "job_id:attempt"
    job_id: str
    attempt: int
    node_id: str
    tenant: str
    objects: list[str]
    manifest: list[ManifestEntry]
    expires_at: datetime
    upload_until: datetime
    revoked_at: datetime | None
    created_at: datetime
    # The digests of the tokens delegated on this grant, once one is.
    delegates: NotRequired[list[str]]


class ResultDoc(TypedDict):
    """One file a job's node stored from /outputs (`results`). Its `_id` is the
    ObjectId the server gives an upserted document; nothing reads it."""

    job_id: str
    attempt: int
    tenant: str
    path: str
    sha256: str
    size: int
    stored_at: datetime
