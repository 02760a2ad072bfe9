"""The data path: what a job reads and writes, and the datacache's commands and events.

Inputs are named by source URI only; credentials live in the datacache's configuration
for each tenant and source, never in a job. Objects are named by the SHA-256 of their
plaintext, which is how a node checks what it received.
"""

from __future__ import annotations

import posixpath
from typing import Annotated

from pydantic import AwareDatetime, Field, StringConstraints, field_validator, model_validator

from shared.messages.base import Payload

Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[\w.-]+$")]
SourceUri = Annotated[str, StringConstraints(min_length=3, max_length=2048)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Uid = Annotated[str, StringConstraints(max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")]
#: Source URI schemes that name DICOM instances in an archive.
DICOM_SCHEMES = ("dicomweb+http:", "dicomweb+https:", "dimse:")

#: Where a container's results are collected; inputs may not be placed there.
OUTPUTS_PATH = "/outputs"
#: Paths an input may not cover: the system's own and the workload's scratch space.
RESERVED_PATHS = ("/", "/proc", "/sys", "/dev", "/etc", "/tmp", OUTPUTS_PATH)


def workload_path(value: str) -> str:
    """An absolute, normalised path in the workload that is not a reserved one."""
    if not value.startswith("/"):
        raise ValueError("must be an absolute path")
    norm = posixpath.normpath(value)
    if norm != value.rstrip("/") or ".." in value.split("/"):
        raise ValueError("must be a normalised path without '..'")
    for reserved in RESERVED_PATHS:
        if norm == reserved or (reserved != "/" and norm.startswith(reserved + "/")):
            raise ValueError(f"{reserved} is reserved")
    return norm


class InputSpec(Payload):
    """One input of a job: where it comes from and where the workload finds it."""

    name: Name = Field(description="Name of the input, unique in the job.")
    source: SourceUri = Field(
        description="xnat://host/projects/P/subjects/S/experiments/E/scans/N/resources/R, "
        "dicomweb+https://host/path/studies/<uid>, dimse://AET@host:port/studies/<uid>, "
        "or https://...",
    )
    path: str = Field(
        max_length=1024, description="Directory in the workload where its files appear."
    )

    transfer_syntax: Uid | None = Field(
        None,
        description="DICOM sources only: the transfer syntax to receive, converted by the "
        "archive (e.g. 1.2.840.10008.1.2.1, Explicit VR Little Endian); absent: every "
        "instance as the archive holds it, byte for byte.",
    )

    @field_validator("path")
    @classmethod
    def _in_workload(cls, value: str) -> str:
        return workload_path(value)

    @model_validator(mode="after")
    def _conversion_of_dicom(self) -> InputSpec:
        if self.transfer_syntax is not None and not self.source.lower().startswith(DICOM_SCHEMES):
            raise ValueError("a transfer_syntax applies to DICOM sources (dicomweb, dimse)")
        return self


class OutputSpec(Payload):
    """What the job writes to /outputs is kept; optionally sent on to a destination."""

    max_mb: int = Field(1024, ge=1, le=1024 * 1024, description="Size bound of /outputs in MiB.")
    destination: SourceUri | None = Field(
        None,
        description="Where to upload the results too: an XNAT resource, a DICOMweb study "
        "(dicomweb+https://HOST/dicom-web/studies/UID; the results are stored into it with "
        "STOW-RS), or an HTTP(S) URL to PUT each file under.",
    )


class StagedFile(Payload):
    """One file of a staged input, or of a job's results."""

    path: str = Field(
        description="Relative path under the input's directory (for a result: under /outputs)."
    )
    sha256: Sha256 = Field(description="SHA-256 of the file's content, lowercase hex.")
    size: int = Field(ge=0, description="Size of the file in bytes.")


class InputManifest(Payload):
    """An input's files, as a node fetches them under a grant."""

    name: Name = Field(description="Name of the input, as in the job.")
    path: str = Field(description="Directory in the workload.")
    files: list[StagedFile] = Field(description="Its files, each with its checksum and size.")


class StagedInput(Payload):
    """An input as the datacache holds it."""

    name: Name = Field(description="Name of the input, as in the job.")
    path: str = Field(description="Directory in the workload.")
    source: str = Field(description="Canonical source URI.")
    version: str | None = Field(
        None, description="Version or ETag the source gave; absent if it gave none."
    )
    files: int = Field(ge=0, description="Number of files in the input.")
    bytes: int = Field(ge=0, description="Total size of its files in bytes.")


# -- commands to the datacache ---------------------------------------------------------


class DataStage(Payload):
    """Command `data.stage`: fetch (or find cached) the inputs of a job."""

    job_id: str = Field(description="The job whose inputs to stage.")
    inputs: list[InputSpec] = Field(min_length=1, description="The job's inputs, as submitted.")


class DataGrant(Payload):
    """Command `data.grant`: let one node read a job's inputs and write its results."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(ge=1, description="The attempt the grant is for, counted from 1.")
    node_id: str = Field(description="The node the attempt is placed on.")
    expires_at: AwareDatetime = Field(description="Reads end here: the job's walltime end.")
    upload_until: AwareDatetime = Field(description="Result uploads end here.")


class DataRelease(Payload):
    """Command `data.release`: the job ended; revoke its grants, unpin its inputs."""

    job_id: str = Field(description="The job that ended.")
    reason: str = Field(max_length=500, description="Why it ended, or its final state.")
    upload_to: SourceUri | None = Field(
        None, description="Destination the job's results go to (set when it succeeded)."
    )


# -- events of the datacache -----------------------------------------------------------


class DataProgress(Payload):
    """Event `data.progress`: staging goes on (at most a few per second per job)."""

    job_id: str = Field(description="The job being staged.")
    input: str = Field(description="Name of the input being fetched.")
    files: int = Field(ge=0, description="Files of the job's inputs stored so far.")
    bytes: int = Field(ge=0, description="Bytes of the job's inputs stored so far.")


class DataFetched(Payload):
    """Event `data.fetched`: who fetched what from which source."""

    job_id: str = Field(description="The job whose staging fetched it.")
    source: str = Field(description="Canonical source URI (never credentials).")
    version: str | None = Field(
        None, description="Version or ETag the source gave; absent if it gave none."
    )
    files: int = Field(ge=0, description="Files fetched.")
    bytes: int = Field(ge=0, description="Bytes fetched.")
    seconds: float = Field(ge=0, description="How long the fetch took, tries included, in seconds.")
    attempts: int = Field(ge=1, description="Tries it took (1 when the first one worked).")


class DataStaged(Payload):
    """Event `data.staged`: every input of the job is in the cache, pinned for it."""

    job_id: str = Field(description="The job's id.")
    inputs: list[StagedInput] = Field(description="Each input as the cache holds it.")
    cached: int = Field(ge=0, description="Inputs found in the cache without a fetch.")


class DataFailed(Payload):
    """Event `data.failed`: staging or granting failed; the job cannot run."""

    job_id: str = Field(description="The job's id.")
    reason: str = Field(description="What failed, in words.")
    source: str | None = Field(
        None, description="The failing input's source URI as the job gave it; absent if none."
    )


class DataGranted(Payload):
    """Event `data.granted`: the node may now read the job's inputs."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The attempt the grant is for, counted from 1.")
    node_id: str = Field(description="The node that may read.")
    objects: int = Field(ge=0, description="Number of distinct input objects it may read.")
    expires_at: AwareDatetime = Field(description="Reads end here: the job's walltime end.")


class DataAccessed(Payload):
    """Event `data.accessed`: a node read (part of) an object, or stored a result."""

    job_id: str = Field(description="The job whose data it is.")
    node_id: str | None = Field(
        None, description="The node that read or wrote; absent for a user's download."
    )
    object: Sha256 = Field(description="SHA-256 of the object's content, lowercase hex.")
    path: str | None = Field(
        None, description="The result's path under /outputs (writes, downloads); else absent."
    )
    bytes: int = Field(ge=0, description="Bytes of content read or written.")
    range: str | None = Field(
        None,
        description="Byte range served (`first-last`) when partial, or `integrity check "
        "failed` when the transfer was cut short; else absent.",
    )
    operation: str = Field("read", description="`read`, `write` or `download`.")


class DataDenied(Payload):
    """Event `data.denied`: an access was refused, and why."""

    job_id: str | None = Field(None, description="The job whose data was asked for.")
    node_id: str | None = Field(
        None, description="The caller's node when a node asked; absent for another caller."
    )
    object: str | None = Field(
        None, description="SHA-256 of the object asked for; absent if the request named none."
    )
    principal: str | None = Field(None, description="Token name of the caller.")
    reason: str = Field(description="Why it was refused, in words.")


class DataQuarantined(Payload):
    """Event `data.quarantined`: a stored object failed its integrity check."""

    object: Sha256 = Field(description="SHA-256 the object's content should have, lowercase hex.")
    reason: str = Field(description="What the check found.")
    job_id: str | None = Field(None, description="The job whose access found it, if one did.")


class DataReleased(Payload):
    """Event `data.released`: the job's grants are revoked and its inputs unpinned."""

    job_id: str = Field(description="The job that ended.")
    grants_revoked: int = Field(ge=0, description="Grants revoked now (0: none was left).")


class DataOutputs(Payload):
    """Event `data.outputs`: the results a job's node stored, kept for its tenant."""

    job_id: str = Field(description="The job's id.")
    attempt: int = Field(description="The latest attempt that stored results.")
    files: list[StagedFile] = Field(description="Each result file, path under /outputs.")
    bytes: int = Field(ge=0, description="Total size of the files in bytes.")


class DataUploaded(Payload):
    """Event `data.uploaded`: the results went (or failed to go) to their destination."""

    job_id: str = Field(description="The job's id.")
    destination: str = Field(description="The destination URI the job named for its results.")
    ok: bool = Field(description="True when the upload succeeded, false when it failed.")
    detail: str = Field(description="A short summary of what was stored, or why it failed.")
