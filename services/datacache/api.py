"""The datacache's HTTP API: nodes read inputs and store results; tenants read results.

Node routes (role `node`, checked against a live grant):
- `GET /v1/jobs/{job_id}/inputs`: the job's inputs, each file with its SHA-256 and size.
- `GET /v1/jobs/{job_id}/objects/{sha256}`: one object's plaintext, streamed, `Range`
  supported.
- `GET /v1/jobs/{job_id}/objects/{sha256}/sealed`: the object as stored, and its data
  key, for the node to open itself (what node agents use; see `read_sealed` for why).
- `POST /v1/jobs/{job_id}/objects/{sha256}/damaged`: a node found an object failing
  authentication; the datacache checks it itself and quarantines it if so.
- `PUT /v1/jobs/{job_id}/outputs/{path}`: store one result file (`POST` does the same,
  for clients that cannot send `PUT`: busybox's `wget` in a Swarm node's uploader).
- `POST /v1/jobs/{job_id}/delegates`: a token standing for the node on this one grant,
  for a task the node runs on another host (`GrantService.delegate`).

Tenant routes (roles `user` and `operator`, a node's token is refused; a tenant sees its
own jobs' results only):
- `GET /v1/jobs/{job_id}/outputs` and `GET /v1/jobs/{job_id}/outputs/{path}`.

Every byte served or stored is a `data.accessed` event; every refusal `data.denied`.

One module because the node and tenant routes serve the same encrypted objects through
the same code: `_stream_object` with its `Range` handling, the quarantine of an object
that fails its integrity check, and the `data.denied` and `data.accessed` events that
every route must emit alike.
"""

from __future__ import annotations

import asyncio
import base64
import os
import posixpath
import re
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import structlog
from aiohttp import web
from pydantic import AwareDatetime, BaseModel, Field

from services.datacache.blobs import BlobStore, SealedBlob
from services.datacache.grants import Access, Denied, GrantService
from services.datacache.metrics import SERVED_BYTES
from services.datacache.quarantine import Quarantine
from services.datacache.store import CacheStore
from shared.auth import Principal, Role
from shared.bus import Bus
from shared.http import PRINCIPAL, ApiError
from shared.messages.data import DataAccessed, DataDenied
from shared.openapi import endpoint
from shared.sealed import DATA_KEY_HEADER, SIZE_HEADER, IntegrityError
from shared.threadio import acquired

log = structlog.get_logger("medhive.datacache.api")

GRANTS = web.AppKey("grants", GrantService)
STORE = web.AppKey("store", CacheStore)
BLOBS = web.AppKey("blobs", BlobStore)
DATA_BUS = web.AppKey("data_bus", Bus)
QUARANTINE = web.AppKey("quarantine", Quarantine)


class InputsView(BaseModel):
    job_id: str
    attempt: int
    inputs: list[dict[str, Any]] = Field(description="Each input with its files.")
    expires_at: AwareDatetime = Field(description="When the grant ends.")


class DelegateView(BaseModel):
    token: str = Field(description="The delegated token; shown only here.")
    grant: str = Field(description="The grant (`job:attempt`) it reaches, and nothing else.")
    expires_at: AwareDatetime = Field(description="Its reads end with the grant's walltime.")
    upload_until: AwareDatetime = Field(description="Its results are stored until then.")


class StoredFile(BaseModel):
    path: str
    sha256: str
    size: int


class OutputsView(BaseModel):
    job_id: str
    files: list[StoredFile]


routes = web.RouteTableDef()
SHA = r"{sha256:[0-9a-f]{64}}"
#: Bytes handed to the kernel per sendfile call: a break is accounted to within this.
SENDFILE_SPAN = 64 * 1024 * 1024
#: One byte range; positions of more than 18 digits are past any object (and past what
#: `int` parses cheaply), so they do not match.
RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")


async def _denied(
    request: web.Request, exc: Denied, job_id: str | None, sha256: str | None = None
) -> ApiError:
    principal = request[PRINCIPAL]
    await request.app[DATA_BUS].emit(
        "data.denied",
        DataDenied(
            job_id=job_id,
            node_id=principal.name if principal.role == "node" else None,
            object=sha256,
            principal=principal.name,
            reason=exc.reason,
        ),
        correlation_id=job_id,
        tenant=principal.tenant,
        actor=principal.name,
    )
    log.warning("access_denied", job_id=job_id, object=sha256, reason=exc.reason)
    return ApiError(exc.status, exc.reason)


def _byte_range(request: web.Request, size: int) -> tuple[int, int, bool]:
    """[start, end) of a `Range: bytes=a-b` header (one range), or the whole object."""
    header = request.headers.get("Range")
    if not header:
        return 0, size, False
    match = RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise ApiError(416, f"unsupported Range {header!r}; use one bytes=a-b range")
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        raise ApiError(416, f"range {header!r} is outside the object's {size} bytes")
    return start, end, True


async def _stream_object(
    request: web.Request, sha256: str, blob_id: str, job_id: str
) -> tuple[web.StreamResponse, int, str | None]:
    """Send an object's plaintext (or the asked range); returns (response, bytes, range)."""
    blobs = request.app[BLOBS]
    try:
        size = await asyncio.to_thread(blobs.size, blob_id)
    except IntegrityError as exc:
        raise await _refused_damaged(request, sha256, blob_id, str(exc), job_id) from None
    start, end, partial = _byte_range(request, size)
    response = web.StreamResponse(status=206 if partial else 200)
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["X-Medhive-Sha256"] = sha256
    if partial:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    await response.prepare(request)
    sent = 0
    try:
        async for chunk in blobs.read(blob_id, start, end):
            await response.write(chunk)
            sent += len(chunk)
    except IntegrityError as exc:
        await _quarantine(request, sha256, blob_id, str(exc), job_id)
        # Cut the transfer short: the client sees a broken download, never bad bytes.
        if request.transport is not None:
            request.transport.close()
        return response, sent, "integrity check failed"
    await response.write_eof()
    return response, sent, f"{start}-{end - 1}" if partial else None


async def _refused_damaged(
    request: web.Request, sha256: str, blob_id: str, reason: str, job_id: str
) -> ApiError:
    """Quarantine an object found damaged before a byte of it went out; the 410 to send."""
    await _quarantine(request, sha256, blob_id, reason, job_id)
    return ApiError(410, f"object {sha256} failed its integrity check and is quarantined")


async def _quarantine(
    request: web.Request, sha256: str, blob_id: str, reason: str, job_id: str | None
) -> None:
    await request.app[QUARANTINE](sha256, blob_id, reason, job_id)


@routes.get("/v1/jobs/{job_id}/inputs")
@endpoint(
    summary="The job's inputs, for the node its grant names.", response=InputsView, roles=("node",)
)
async def job_inputs(request: web.Request) -> web.Response:
    """The manifest, asked for when a node starts to read the job's inputs: the moment
    they are used, for eviction's least-recently-used order (one write for all of them,
    not one per object read: a study is thousands of objects)."""
    job_id = request.match_info["job_id"]
    try:
        access = await request.app[GRANTS].check(request[PRINCIPAL], job_id, "expires_at")
    except Denied as exc:
        raise await _denied(request, exc, job_id) from None
    grant = access.grant
    await request.app[STORE].touch(list(grant["objects"]))
    return web.json_response(
        {
            "job_id": job_id,
            "attempt": grant["attempt"],
            "inputs": grant["manifest"],
            "expires_at": grant["expires_at"].isoformat(),
        }
    )


async def _granted_object(request: web.Request) -> tuple[str, str, str, Access]:
    """(job id, object, blob id, access) of a node route on one object of a live grant."""
    job_id, sha256 = request.match_info["job_id"], request.match_info["sha256"]
    try:
        access = await request.app[GRANTS].check(request[PRINCIPAL], job_id, "expires_at", sha256)
    except Denied as exc:
        raise await _denied(request, exc, job_id, sha256) from None
    assert access.object is not None
    return job_id, sha256, access.object["blob"], access


@routes.get(f"/v1/jobs/{{job_id}}/objects/{SHA}")
@endpoint(
    summary="One input object, decrypted, for the granted node.",
    media="application/octet-stream",
    also=(206,),
    errors=(404, 416),
    roles=("node",),
    headers={"Range": "One `bytes=a-b` range."},
)
async def read_object(request: web.Request) -> web.StreamResponse:
    job_id, sha256, blob_id, access = await _granted_object(request)
    response, sent, byte_range = await _stream_object(request, sha256, blob_id, job_id)
    request.app[SERVED_BYTES].labels("node").inc(sent)
    await request.app[DATA_BUS].emit(
        "data.accessed",
        DataAccessed(
            job_id=job_id, node_id=access.node_id, object=sha256, bytes=sent, range=byte_range
        ),
        correlation_id=job_id,
        tenant=access.grant["tenant"],
        actor=access.node_id,
    )
    return response


class DamageView(BaseModel):
    quarantined: bool = Field(description="Whether the datacache's own check failed too.")
    reason: str | None = None


@routes.get(f"/v1/jobs/{{job_id}}/objects/{SHA}/sealed")
@endpoint(
    summary="One input object as stored, with its data key, for the granted node.",
    media="application/octet-stream",
    errors=(404,),
    roles=("node",),
)
async def read_sealed(request: web.Request) -> web.StreamResponse:
    """The object's file as it lies on disk, sent by the kernel (sendfile), with its data
    key in `X-Medhive-Data-Key`: the node authenticates and decrypts it itself.

    Why the node decrypts, not the datacache: one datacache serves every node, and
    decrypting costs it a core per 1.2 GB/s served (measured by `bench.datacache`),
    while sending the stored bytes costs almost nothing; the decryption moves to the
    nodes, each doing its own share. What it means for the threat model: the node gets
    the key of each object its live grant names, and only over its authenticated
    channel. That key opens that object and nothing else (every object has its own),
    and the node receives that object's plaintext in any case, so no one learns more
    than before. The master keys never leave the datacache, so the store's files are
    still useless without it; the key is in no log and no message. Integrity holds as
    before: the node authenticates every segment before using it and checks the SHA-256
    the grant names, and reports a failure (`/damaged`) so the object is quarantined.
    """
    job_id, sha256, blob_id, access = await _granted_object(request)
    blobs = request.app[BLOBS]
    try:
        sealed, file = await acquired(lambda: blobs.open_sealed(blob_id), lambda o: o[1].close())
    except IntegrityError as exc:
        raise await _refused_damaged(request, sha256, blob_id, str(exc), job_id) from None
    with file:  # the one the header was read from
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = sealed.stored_size
        response.headers["X-Medhive-Sha256"] = sha256
        response.headers[SIZE_HEADER] = str(sealed.size)
        response.headers[DATA_KEY_HEADER] = base64.b64encode(sealed.data_key).decode()
        sent = 0
        try:
            await response.prepare(request)
            sent = await _sendfile(request, sealed, file)
            await response.write_eof()
        finally:
            request.app[SERVED_BYTES].labels("node").inc(sent)
            await request.app[DATA_BUS].emit(
                "data.accessed",
                DataAccessed(
                    job_id=job_id,
                    node_id=access.node_id,
                    object=sha256,
                    bytes=sealed.plaintext_in(sent),
                ),
                correlation_id=job_id,
                tenant=access.grant["tenant"],
                actor=access.node_id,
            )
        return response


async def _sendfile(request: web.Request, sealed: SealedBlob, file: BinaryIO) -> int:
    """Send the blob's open file on the request's connection; bytes handed to the kernel
    (on a break: up to and including the span under way, so a read is never
    under-counted)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the node went away")
    loop = asyncio.get_running_loop()
    sent = 0
    # Read ahead as far as the kernel will: the whole file goes out, in order.
    os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    while sent < sealed.stored_size:
        span = min(SENDFILE_SPAN, sealed.stored_size - sent)
        try:
            await loop.sendfile(transport, file, sent, span)
        except BaseException:
            sent += span
            raise
        sent += span
    return sent


@routes.post(f"/v1/jobs/{{job_id}}/objects/{SHA}/damaged")
@endpoint(
    summary="A node reports an object that failed authentication; checked, quarantined.",
    response=DamageView,
    errors=(404,),
    roles=("node",),
)
async def report_damage(request: web.Request) -> web.Response:
    """The datacache reads the whole object itself: a node's word alone never
    quarantines an object (a faulty or hostile node could otherwise withdraw any
    object from every job), and a damaged one is quarantined even if no one else
    would have read it soon."""
    job_id, sha256, blob_id, access = await _granted_object(request)
    log.warning("object_reported_damaged", job_id=job_id, object=sha256, node=access.node_id)
    try:
        actual = await request.app[BLOBS].verify(blob_id)
        if actual != sha256:
            raise IntegrityError(f"its content hashes to {actual}")
    except IntegrityError as exc:
        await _quarantine(request, sha256, blob_id, str(exc), job_id)
        return web.json_response({"quarantined": True, "reason": str(exc)})
    return web.json_response({"quarantined": False, "reason": None})


@routes.post("/v1/jobs/{job_id}/delegates")
@endpoint(
    summary="A token standing for the granted node on this grant only, for a task it runs "
    "elsewhere.",
    response=DelegateView,
    status=201,
    roles=("node",),
)
async def delegate_grant(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    try:
        token, grant = await request.app[GRANTS].delegate(request[PRINCIPAL], job_id)
    except Denied as exc:
        raise await _denied(request, exc, job_id) from None
    view = {
        "token": token,
        "grant": grant["_id"],
        "expires_at": grant["expires_at"].isoformat(),
        "upload_until": grant["upload_until"].isoformat(),
    }
    return web.json_response(view, status=201)


def _result_path(raw: str) -> str:
    path = posixpath.normpath(raw)
    if raw.startswith("/") or path.startswith("..") or path in (".", ""):
        raise ApiError(400, f"result path {raw!r} must be relative, without '..'")
    return path


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(1 << 20):
        yield chunk


#: What a node's storing of one result file says, whichever method it comes by.
STORING = {"raw_body": True, "response": StoredFile, "status": 201, "errors": (400,),
           "roles": ("node",)}  # fmt: skip


@routes.put("/v1/jobs/{job_id}/outputs/{path:.+}")
@endpoint(summary="Store one result file (the granted node, until its upload deadline).", **STORING)
async def store_output(request: web.Request) -> web.Response:
    job_id, path = request.match_info["job_id"], _result_path(request.match_info["path"])
    try:
        access = await request.app[GRANTS].check(request[PRINCIPAL], job_id, "upload_until")
    except Denied as exc:
        raise await _denied(request, exc, job_id) from None
    tenant, attempt = access.grant["tenant"], access.grant["attempt"]
    blobs, store = request.app[BLOBS], request.app[STORE]
    blob = await blobs.write(_body(request))
    holder = await store.add_object(blob.sha256, blob.blob_id, blob.size, tenant)
    if holder != blob.blob_id:
        await blobs.delete(blob.blob_id)
    await store.put_result(job_id, attempt, tenant, path, blob.sha256, blob.size)
    await request.app[DATA_BUS].emit(
        "data.accessed",
        DataAccessed(
            job_id=job_id,
            node_id=access.node_id,
            object=blob.sha256,
            path=path,
            bytes=blob.size,
            operation="write",
        ),
        correlation_id=job_id,
        tenant=tenant,
        actor=access.node_id,
    )
    return web.json_response({"path": path, "sha256": blob.sha256, "size": blob.size}, status=201)


@routes.post("/v1/jobs/{job_id}/outputs/{path:.+}")
@endpoint(
    summary="Store one result file, as PUT does: for clients that cannot send PUT (the busybox "
    "`wget` of a Swarm node's uploader).",
    **STORING,
)
async def store_output_posted(request: web.Request) -> web.StreamResponse:
    return await store_output(request)


async def _tenant_reader(request: web.Request, job_id: str) -> Principal:
    """A user or operator of the job's tenant reads its results; a node's token, which
    stores them, reads none (refused and recorded like every other refusal)."""
    principal = request[PRINCIPAL]
    if principal.role not in (Role.user, Role.operator):
        denied = Denied(403, "this needs the user or operator role")
        raise await _denied(request, denied, job_id)
    return principal


@routes.get("/v1/jobs/{job_id}/outputs")
@endpoint(
    summary="The job's results (its tenant's users and operators).",
    response=OutputsView,
    roles=("user", "operator"),
)
async def list_outputs(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    await _tenant_reader(request, job_id)
    results = await request.app[STORE].job_results(job_id, request[PRINCIPAL].tenant)
    files = [{"path": r["path"], "sha256": r["sha256"], "size": r["size"]} for r in results]
    return web.json_response({"job_id": job_id, "files": files})


@routes.get("/v1/jobs/{job_id}/outputs/{path:.+}")
@endpoint(
    summary="One result file, decrypted.",
    media="application/octet-stream",
    also=(206,),
    errors=(404, 416),
    roles=("user", "operator"),
    headers={"Range": "One `bytes=a-b` range."},
)
async def download_output(request: web.Request) -> web.StreamResponse:
    job_id, path = request.match_info["job_id"], _result_path(request.match_info["path"])
    principal = await _tenant_reader(request, job_id)
    results = await request.app[STORE].job_results(job_id, principal.tenant)
    match = next((r for r in results if r["path"] == path), None)
    if match is None:
        raise ApiError(404, f"job {job_id} has no output {path}")
    obj = await request.app[STORE].get_object(match["sha256"])
    if obj is None or obj["quarantined"]:
        raise ApiError(410, f"output {path} failed its integrity check and is quarantined")
    response, sent, byte_range = await _stream_object(request, match["sha256"], obj["blob"], job_id)
    request.app[SERVED_BYTES].labels("tenant").inc(sent)
    await request.app[DATA_BUS].emit(
        "data.accessed",
        DataAccessed(
            job_id=job_id,
            object=match["sha256"],
            path=path,
            bytes=sent,
            range=byte_range,
            operation="download",
        ),
        correlation_id=job_id,
        tenant=principal.tenant,
        actor=principal.name,
    )
    return response
