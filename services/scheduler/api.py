"""The job gateway API. Every route is scoped to the caller's tenant: another
tenant's job is indistinguishable from a job that does not exist (404).

One module because its routes share that scoping (`_tenant_job`, `_listed_tenant`), the
one public shape of a job (`public_job`), and the `Placer`'s in-memory view of what
waits and what is placed, which the job, tenant and node routes all read; the webhook
routes, which share none of it, are in webhook_api.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from pydantic import Field
from yarl import URL

from services.scheduler.documents import JobCommand, JobDocument
from services.scheduler.jobs import JobFinished, JobNotFound, JobService
from services.scheduler.nodes import NodeStore
from services.scheduler.output import OutputStore
from services.scheduler.placement import Held, Placed, Placer
from services.scheduler.store import INTERNAL_FIELDS, IdempotencyConflict, JobStore
from services.scheduler.tenants import QueueFull, TenantBook, TenantPolicy
from services.scheduler.views import (
    BatchAnswers,
    JobBatch,
    JobPage,
    JobsQuery,
    JobView,
    Logs,
    LogsQuery,
    Me,
    Nodes,
    Outputs,
    Tenants,
)
from services.scheduler.webhook_api import add_webhook_routes
from shared.auth import Principal, Role
from shared.envelope import utcnow
from shared.http import PRINCIPAL, ApiError, read_model, read_query, roles
from shared.identity import check_name
from shared.messages.base import Payload
from shared.messages.jobs import JobSpec
from shared.mongo import Document
from shared.openapi import endpoint

JOBS = web.AppKey("jobs", JobService)
STORE = web.AppKey("store", JobStore)
NODES = web.AppKey("nodes", NodeStore)
OUTPUT = web.AppKey("output", OutputStore)
PLACER = web.AppKey("placer", Placer)
TENANTS = web.AppKey("tenants", TenantBook)
HTTP = web.AppKey("http", aiohttp.ClientSession)
DATACACHE_URL = web.AppKey("datacache_url", str)

routes = web.RouteTableDef()


class CancelBody(Payload):
    """Optional body of `DELETE /v1/jobs/{id}`."""

    reason: str = Field(max_length=500, description="Why, for the job's history.")


def _json(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value


def public_job(doc: JobDocument) -> Document:
    """A job as clients see it: no internal fields, `id` instead of `_id`."""
    hidden = INTERNAL_FIELDS | {"priority", "idempotency_key"}
    out = {"id": doc["_id"], **{k: v for k, v in doc.items() if k not in hidden}}
    if doc.get("state") != "running":
        out.pop("interactive", None)  # forwards end with the run
    return dict(_json(out))


def _job_id(request: web.Request) -> str:
    return request.match_info["job_id"]


@routes.post("/v1/jobs")
@roles(Role.user, Role.operator)
@endpoint(
    summary="Submit a job for the caller's tenant (an idempotency key repeats).",
    body=JobSpec,
    response=JobView,
    status=201,
    also=(200,),
    errors=(409, 429),
    links=("get_job", "logs", "outputs", "cancel"),
)
async def submit(request: web.Request) -> web.Response:
    spec = await read_model(request, JobSpec)
    status, body = await _submit(request, spec)
    if status == 409:
        raise ApiError(409, body["detail"], job_id=body["job_id"])
    if status == 429:
        raise ApiError(429, body["detail"])
    return web.json_response(body["job"], status=status)


@routes.post("/v1/jobs/batch")
@roles(Role.user, Role.operator)
@endpoint(
    summary="Submit many jobs at once; each is answered as `POST /v1/jobs` would answer it.",
    body=JobBatch,
    response=BatchAnswers,
)
async def submit_batch(request: web.Request) -> web.Response:
    batch = await read_model(request, JobBatch)
    # Submitted together, the jobs are stored together (one group of writes).
    answers = await asyncio.gather(*(_submit(request, spec) for spec in batch.jobs))
    results = [{"status": status, "job": body.get("job"), "detail": body.get("detail")}
               for status, body in answers]  # fmt: skip
    return web.json_response({"results": results})


async def _submit(request: web.Request, spec: JobSpec) -> tuple[int, Document]:
    """One job for the caller's tenant: (201 or 200, the job) or (409, why)."""
    principal = request[PRINCIPAL]
    # Each job is a command of its own; the idempotency key is how a client repeats.
    command: JobCommand = {"id": str(uuid.uuid4()), "sender": principal.name}
    try:
        submission = await request.app[JOBS].submit(
            principal.tenant, principal.name, spec, command, redeliverable=False
        )
    except IdempotencyConflict as exc:
        detail = (
            f"idempotency key {spec.idempotency_key!r} already names job {exc.args[0]} "
            "with a different description"
        )
        return 409, {"detail": detail, "job_id": exc.args[0]}
    except QueueFull as exc:
        return 429, {"detail": str(exc)}
    return (201 if submission.created else 200), {"job": public_job(submission.job)}


@routes.get("/v1/me")
@roles(Role.user, Role.operator)
@endpoint(summary="Who the caller's token is: its name, tenant and role.", response=Me)
async def me(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    body = {"name": principal.name, "tenant": principal.tenant, "role": principal.role.value}
    return web.json_response(body)


@routes.get("/v1/jobs")
@roles(Role.user, Role.operator)
@endpoint(
    summary="The tenant's jobs, newest first (operators: any tenant's, or all).",
    query=JobsQuery,
    response=JobPage,
)
async def list_jobs(request: web.Request) -> web.Response:
    query = read_query(request, JobsQuery)
    state = query.state.value if query.state is not None else None
    tenant = _listed_tenant(request[PRINCIPAL], query.tenant)
    docs = await request.app[STORE].page(tenant, state, query.before, query.limit, query.name)
    next_before = docs[-1]["_id"] if len(docs) == query.limit else None
    return web.json_response({"jobs": [public_job(d) for d in docs], "next_before": next_before})


def _listed_tenant(principal: Principal, asked: str | None) -> str | None:
    """Whose jobs a listing shows (None: everyone's). Operators read every tenant's
    jobs, as they read every tenant's audit; a user only its own."""
    if asked is None or asked == principal.tenant:
        return principal.tenant
    if principal.role != Role.operator:
        raise ApiError(403, f"a user token sees only its own tenant, {principal.tenant!r}")
    return None if asked == "*" else asked


@routes.get("/v1/jobs/{job_id}")
@roles(Role.user, Role.operator)
@endpoint(
    summary="One job with its history (operators: any tenant's).", response=JobView, errors=(404,)
)
async def get_job(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    # An operator reads any tenant's job (not its logs or results, nor cancels it).
    tenant = None if principal.role == Role.operator else principal.tenant
    found = await request.app[STORE].get(_job_id(request), tenant)
    if found is None:
        raise ApiError(404, f"no job {_job_id(request)}")
    job = public_job(found)
    if job["state"] in ("queued", "staging"):
        job["waiting_for"] = await _waiting_for(request.app[PLACER], job)
    return web.json_response(job)


async def _waiting_for(placer: Placer, job: Document) -> str:
    if job["state"] == "staging" and not job.get("inputs_staged"):
        return "its inputs are being staged"
    why = await placer.waiting_for(job["id"])
    return why or "placement is taking it"


@routes.get("/v1/tenants")
@roles(Role.operator)
@endpoint(summary="Every tenant's share, usage and quota, with what it holds and queues.",
          response=Tenants)  # fmt: skip
async def list_tenants(request: web.Request) -> web.Response:
    placer, book = request.app[PLACER], request.app[TENANTS]
    held, now = placer.held(), utcnow()
    names = sorted(set(book.policies) | set(book.usage) | set(held) | set(placer.view.unplaced))
    tenants = []
    for name in names:
        policy, holds = book.policy(name), held.get(name, Held())
        tenants.append(
            {
                "tenant": name,
                "share": policy.share,
                "quota": policy.quota.model_dump(mode="json"),
                "usage_cpu_s": round(book.used(name, now), 3),
                "load": round(book.load_of(name, holds.rate, now), 6),
                "running_cpus": holds.cpus,
                "running_memory_mb": holds.memory_mb,
                "running_jobs": holds.jobs,
                "queued_jobs": len(placer.view.unplaced.get(name, ())),
            }
        )
    return web.json_response({"tenants": tenants, "half_life_s": book.half_life_s})


@routes.put("/v1/tenants/{tenant}")
@roles(Role.operator)
@endpoint(summary="Set a tenant's share and quota (in effect at once, kept across restarts).",
          body=TenantPolicy, response=TenantPolicy)  # fmt: skip
async def set_tenant(request: web.Request) -> web.Response:
    try:
        tenant = check_name(request.match_info["tenant"])
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    policy = await read_model(request, TenantPolicy)
    await request.app[TENANTS].set_policy(tenant, policy)
    request.app[PLACER].wake()  # a larger share or quota may let a job go now
    return web.json_response(policy.model_dump(mode="json"))


@routes.delete("/v1/jobs/{job_id}")
@roles(Role.user, Role.operator)
@endpoint(
    summary="Cancel a job (its node stops it, then it is cancelled).",
    body=CancelBody,
    body_optional=True,
    response=JobView,
    status=202,
    errors=(404, 409),
)
async def cancel(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    reason = f"cancelled by {principal.name}"
    if request.can_read_body:
        reason = (await read_model(request, CancelBody)).reason
    try:
        job = await request.app[JOBS].cancel(_job_id(request), principal.tenant, reason)
    except JobNotFound as exc:
        raise ApiError(404, f"no job {_job_id(request)}") from exc
    except JobFinished as exc:
        raise ApiError(409, f"job {_job_id(request)} already ended: {exc.args[0]}") from exc
    current = await request.app[STORE].get(job["_id"], principal.tenant)
    return web.json_response(public_job(current or job), status=202)


@routes.get("/v1/jobs/{job_id}/logs")
@roles(Role.user, Role.operator)
@endpoint(
    summary="What the job printed (the last bytes).", query=LogsQuery, response=Logs, errors=(404,)
)
async def logs(request: web.Request) -> web.Response:
    job = await _tenant_job(request)
    chosen = read_query(request, LogsQuery).attempt
    attempt = job["attempt"] if chosen is None else chosen
    streams = await request.app[OUTPUT].get_output(job["_id"], attempt)
    body = {"job_id": job["_id"], "attempt": attempt, "state": job["state"]}
    for name in ("stdout", "stderr"):
        doc = streams.get(name)
        body[name] = doc["data"] if doc else ""
        body[f"{name}_truncated"] = bool(doc and doc["truncated"])
    return web.json_response(body)


async def _tenant_job(request: web.Request) -> JobDocument:
    job = await request.app[STORE].get(_job_id(request), request[PRINCIPAL].tenant)
    if job is None:
        raise ApiError(404, f"no job {_job_id(request)}")
    return job


@routes.get("/v1/jobs/{job_id}/outputs")
@roles(Role.user, Role.operator)
@endpoint(summary="The job's results.", response=Outputs, errors=(404,))
async def outputs(request: web.Request) -> web.Response:
    """The job's results, as the datacache reported them when the job ended."""
    job = await _tenant_job(request)
    kept = job.get("outputs") or {"files": [], "bytes": 0}
    return web.json_response(_json({
        "job_id": job["_id"], "state": job["state"], "files": kept["files"],
        "bytes": kept["bytes"], "upload": job.get("outputs_upload"),
    }))  # fmt: skip


@routes.get("/v1/jobs/{job_id}/outputs/{path:.+}")
@roles(Role.user, Role.operator)
@endpoint(
    summary="One result file, from the datacache.",
    media="application/octet-stream",
    also=(206,),
    errors=(404, 416, 502),
    headers={"Range": "One `bytes=a-b` range."},
)
async def download_output(request: web.Request) -> web.StreamResponse:
    """One result file, streamed from the datacache with the caller's own token, so the
    datacache checks the tenant again rather than trusting the gateway."""
    job = await _tenant_job(request)
    path = request.match_info["path"]
    # Only a file the job's listing names goes on to the datacache, and as one
    # encoded path: no `..` or encoded slash can make the request another route.
    listed = job.get("outputs")
    if path not in {item["path"] for item in (listed["files"] if listed else [])}:
        raise ApiError(404, f"job {job['_id']} has no output {path!r}")
    base = URL(request.app[DATACACHE_URL])
    url = base.with_path(
        f"/v1/jobs/{quote(job['_id'], safe='')}/outputs/{quote(path)}", encoded=True
    )
    headers = {"Authorization": request.headers["Authorization"]}
    if "Range" in request.headers:
        headers["Range"] = request.headers["Range"]
    try:
        async with request.app[HTTP].get(url, headers=headers) as upstream:
            if upstream.status >= 400:
                raise ApiError(
                    upstream.status if upstream.status < 500 else 502,
                    await _upstream_detail(upstream),
                )
            response = web.StreamResponse(status=upstream.status)
            for name in ("Content-Length", "Content-Range", "Accept-Ranges", "X-Medhive-Sha256"):
                if name in upstream.headers:
                    response.headers[name] = upstream.headers[name]
            response.content_type = "application/octet-stream"
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(1 << 20):
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        raise ApiError(502, f"the datacache is unreachable: {exc}") from exc


async def _upstream_detail(upstream: aiohttp.ClientResponse) -> str:
    """What the datacache said of an error, whatever the shape of its answer."""
    fallback = f"the datacache answered {upstream.status}"
    try:
        body = json.loads(await upstream.read())
    except ValueError:
        return fallback
    error = body.get("error") if isinstance(body, dict) else None
    detail = error.get("detail") if isinstance(error, dict) else None
    return detail if isinstance(detail, str) else fallback


@routes.get("/v1/nodes")
@roles(Role.user, Role.operator)
@endpoint(summary="The nodes and their free capacity.", response=Nodes)
async def nodes(request: web.Request) -> web.Response:
    placer, principal = request.app[PLACER], request[PRINCIPAL]
    free, _ = await placer.free_capacity()
    placed: dict[str, list[Placed]] = {}
    for job in placer.view.holding.values():
        placed.setdefault(job.node_id, []).append(job)
    out = []
    for node in await request.app[NODES].all_nodes():
        room = free.get(node["_id"])
        there = placed.get(node["_id"], [])
        everyone = principal.role == Role.operator
        readable = [job.job_id for job in there if everyone or job.tenant == principal.tenant]
        out.append(
            _json(
                {
                    "id": node["_id"],
                    "online": node["online"] and room is not None,
                    "cpus": node["cpus"],
                    "memory_mb": node["memory_mb"],
                    "free_cpus": room.cpus if room else 0,
                    "free_memory_mb": room.memory_mb if room else 0,
                    "runtimes": node.get("runtimes", []),
                    "last_seen": node["last_seen"],
                    "running_jobs": len(there),
                    "job_ids": sorted(readable),
                }
            )
        )
    return web.json_response({"nodes": out})


# The webhook routes (webhook_api.py) are this API's too, and in its document.
add_webhook_routes(routes)

__all__ = ["DATACACHE_URL", "HTTP", "JOBS", "PLACER", "STORE", "public_job", "routes"]
