"""The audit HTTP API: query records, follow them live (SSE), verify the chain.

A `user` token sees only its own tenant's records; records without a tenant (node
events, rejected messages, invalid bodies) are for operators only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from pymongo.errors import PyMongoError

from services.audit.chain import verify
from services.audit.recorder import NOTIFIER
from services.audit.records import public
from services.audit.store import STORE, RecordQuery
from services.audit.views import (
    MAX_SEQ,
    ChainVerdict,
    EventFilters,
    EventsHead,
    EventsPage,
    EventsQuery,
)
from shared.auth import Role
from shared.http import PRINCIPAL, ApiError, read_query, roles
from shared.openapi import endpoint

log = structlog.get_logger("medhive.audit.api")

routes = web.RouteTableDef()

#: A stream sends what matches in pages of this size.
STREAM_PAGE = 500
#: Seconds between comment lines on an idle stream, so proxies keep it open.
KEEPALIVE_S = 15.0


class StreamSlots:
    """How many live streams are open, per token and in all: each holds a request
    and a database cursor for as long as the client likes, so past a bound a new one
    is refused (429) rather than letting a few clients starve everyone."""

    def __init__(self, per_token: int, total: int) -> None:
        self.per_token = per_token
        self.total = total
        self._open: dict[str, int] = {}

    def take(self, token: str) -> None:
        if sum(self._open.values()) >= self.total:
            raise ApiError(429, f"{self.total} live streams are open already; try again later")
        if self._open.get(token, 0) >= self.per_token:
            raise ApiError(
                429, f"this token has {self.per_token} live streams open; close one first"
            )
        self._open[token] = self._open.get(token, 0) + 1

    def give_back(self, token: str) -> None:
        left = self._open.get(token, 0) - 1
        if left > 0:
            self._open[token] = left
        else:
            self._open.pop(token, None)


STREAM_SLOTS = web.AppKey("audit_stream_slots", StreamSlots)


@routes.get("/v1/events")
@roles(Role.user, Role.operator)
@endpoint(summary="A page of audit records, oldest first.", query=EventsQuery, response=EventsPage)
async def list_events(request: web.Request) -> web.Response:
    """A page of records in `seq` order; `next_after` is the cursor of the next page."""
    asked = read_query(request, EventsQuery)
    query, after, limit = _query(request, asked), asked.after, asked.limit
    # One more than asked tells whether there is a next page. Reading only up to the
    # recorder's head shows whole batches, never a batch that is half inserted.
    head = request.app[NOTIFIER].head
    records = await request.app[STORE].page(query, after=after, limit=limit + 1, upto=head)
    more = len(records) > limit
    records = records[:limit]
    return web.json_response(
        {
            "events": [public(record) for record in records],
            "next_after": records[-1]["seq"] if more else None,
        }
    )


@routes.get("/v1/events/head")
@roles(Role.user, Role.operator)
@endpoint(summary="Where the audit trail ends now: a live view starts after it.",
          response=EventsHead)  # fmt: skip
async def events_head(request: web.Request) -> web.Response:
    return web.json_response({"seq": request.app[NOTIFIER].head})


@routes.get("/v1/events/stream")
@roles(Role.user, Role.operator)
@endpoint(
    summary="Audit records as server-sent events, live, resumable.",
    query=EventFilters,
    media="text/event-stream",
    errors=(429,),
    headers={"Last-Event-ID": "The last `id` seen: the stream goes on after it."},
)
async def stream_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: every matching record after the cursor, then live ones.

    The cursor is `Last-Event-ID` (sent by a reconnecting client) or `?after=`. Only
    records up to the recorder's head are read, all of which are stored, so a record
    is never sent before one with a lower `seq` that matches too.
    """
    asked = read_query(request, EventFilters)
    query, after = _query(request, asked), _last_event_id(request, asked.after)
    slots, holder = request.app[STREAM_SLOTS], request[PRINCIPAL].name
    slots.take(holder)
    try:
        return await _stream(request, query, after)
    finally:
        slots.give_back(holder)


async def _stream(request: web.Request, query: RecordQuery, after: int) -> web.StreamResponse:
    store, notifier = request.app[STORE], request.app[NOTIFIER]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on at once
        }
    )
    await response.prepare(request)
    try:
        while not notifier.closed:
            head = notifier.head
            if (recent := notifier.recent(after, head)) is not None:  # just stored
                records = list(itertools.islice(filter(query.matches, recent), STREAM_PAGE))
            else:
                # Shielded: a client that goes away cancels this handler, and a database
                # operation cancelled half-way drops its connection unclosed.
                records = await asyncio.shield(
                    store.page(query, after=after, limit=STREAM_PAGE, upto=head)
                )
            if records:
                await response.write(b"".join(_event(record) for record in records))
            if len(records) == STREAM_PAGE:
                after = records[-1]["seq"]
                continue
            # Everything up to the head has been looked at (a cursor may be ahead of it).
            after = max(after, head)
            if not await notifier.wait_past(after, KEEPALIVE_S):
                await response.write(b": keepalive\n\n")
    except ConnectionResetError:
        log.debug("audit_stream_client_gone")
    except PyMongoError as exc:
        # The headers are sent: end the stream; the client resumes from its last id.
        log.warning("audit_stream_store_failed", error=repr(exc)[:500])
    return response


@routes.get("/v1/audit/verify")
@roles(Role.operator)
@endpoint(summary="Check the whole hash chain.", response=ChainVerdict)
async def verify_chain(request: web.Request) -> web.Response:
    """Check the whole chain (operators only); reads every record."""
    verdict = await verify(request.app[STORE])
    if not verdict.ok:
        log.warning("audit_chain_broken", first_bad_seq=verdict.first_bad_seq)
    return web.json_response(verdict.as_json())


def _query(request: web.Request, asked: EventFilters) -> RecordQuery:
    """The filters asked for; a user's are confined to its own tenant."""
    principal = request[PRINCIPAL]
    tenant = asked.tenant
    if principal.role != Role.operator:
        if tenant is not None and tenant != principal.tenant:
            raise ApiError(403, f"a user token sees only its own tenant, {principal.tenant!r}")
        tenant = principal.tenant
    return RecordQuery(
        job=asked.job,
        tenant=tenant,
        type_prefix=asked.type,
        since=_time(asked.since, "since"),
        until=_time(asked.until, "until"),
    )


def _time(raw: str | None, name: str) -> datetime | None:
    """An ISO 8601 time query parameter; without a zone it is UTC."""
    if not raw:
        return None
    try:
        # An unencoded "+01:00" arrives as " 01:00": take the space for the plus it was.
        moment = datetime.fromisoformat(raw.strip().replace(" ", "+"))
        # In UTC, as the records are; a time whose UTC is outside the calendar
        # (year 1 at +14:00) is refused here, not deep in the store.
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ApiError(
            400, f"query parameter {name} must be an ISO 8601 time, e.g. 2025-01-31T12:00:00Z"
        ) from exc


def _last_event_id(request: web.Request, after: int) -> int:
    """Where a stream starts: after `Last-Event-ID` if the client sent one, else `after`."""
    header = request.headers.get("Last-Event-ID", "").strip()
    if not header:
        return after
    try:
        seq = int(header)
    except ValueError as exc:
        raise ApiError(400, "header Last-Event-ID must be a record's seq (an integer)") from exc
    if not 0 <= seq <= MAX_SEQ:
        raise ApiError(400, "header Last-Event-ID is out of range")
    return seq


def _event(record: dict[str, Any]) -> bytes:
    """One server-sent event; `data` is one line, as `json.dumps` writes it."""
    shown = public(record)
    # A type comes from the message: no line break may end the field early.
    kind = "".join(str(shown.get("type") or "unknown").split())
    data = json.dumps(shown, separators=(",", ":"))
    return f"id: {shown['seq']}\nevent: {kind}\ndata: {data}\n\n".encode()
