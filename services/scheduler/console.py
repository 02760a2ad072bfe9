"""The web console: a page for users and operators, served by the scheduler at `/ui/`.

The page is three static files shipped in this package (`console/`): plain HTML, CSS
and JavaScript, no build step, nothing loaded from elsewhere (its Content-Security-
Policy forbids it). It signs in with an API token, kept in the tab's `sessionStorage`
and sent as a bearer header: no cookie carries authority, so no other site can make
the browser act for the user (no CSRF surface), and the page sees exactly what its
token sees through the API.

The audit's read routes (`/v1/events`, its `/head` and `/stream`, `/v1/audit/verify`) are
passed through here at their own paths, with the caller's own token, so the page talks
to one origin (no CORS to configure, one address to publish) and the audit service
still decides what the token may read. A pass-through stream ends when the browser
goes away, not at the audit's next keep-alive, so it never holds one of the token's
few stream slots after its tab closed.
"""

from __future__ import annotations

import asyncio
from importlib import resources

import aiohttp
import structlog
from aiohttp import web
from yarl import URL

from services.scheduler.api import HTTP
from shared.auth import Role
from shared.http import ApiError, roles
from shared.openapi import outside_document

log = structlog.get_logger("medhive.scheduler.console")

AUDIT_URL = web.AppKey("audit_url", str)

#: The console's files and their media types; nothing else is served under /ui/.
FILES = {
    "index.html": "text/html",
    "console.css": "text/css",
    "console.js": "text/javascript",
}
#: What the page may do: only this origin's scripts, styles and API, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: The audit routes the console reads, passed through as they are.
AUDIT_ROUTES = ("/v1/events", "/v1/events/head", "/v1/events/stream", "/v1/audit/verify")
#: How often a pass-through stream looks whether its browser is still there.
CLIENT_CHECK_S = 1.0

routes = web.RouteTableDef()


def _read(name: str) -> bytes:
    return resources.files("services.scheduler").joinpath("console", name).read_bytes()


@routes.get("/ui")
@outside_document("the console's page, not an API")
async def console_root(_: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/ui/")


@routes.get("/ui/")
@routes.get("/ui/{name}")
@outside_document("the console's page, not an API")
async def console_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "index.html")
    if name not in FILES:
        raise ApiError(404, f"the console has no file {name!r}")
    return web.Response(
        body=_read(name), content_type=FILES[name], charset="utf-8", headers=SECURITY_HEADERS
    )


@roles(Role.user, Role.operator)
@outside_document("the audit's routes, described in the audit's own document")
async def audit_pass_through(request: web.Request) -> web.StreamResponse:
    """One audit read, answered by the audit service with the caller's own token (which
    it checks again: what a user may read of the audit is the audit's rule)."""
    url = URL(request.app[AUDIT_URL]).with_path(request.path).with_query(request.query)
    headers = {"Authorization": request.headers["Authorization"]}
    if "Last-Event-ID" in request.headers:
        headers["Last-Event-ID"] = request.headers["Last-Event-ID"]
    # A stream lasts as long as the browser likes: no overall timeout.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    try:
        upstream = await request.app[HTTP].get(url, headers=headers, timeout=timeout)
    except aiohttp.ClientError as exc:
        log.warning("audit_unreachable", error=repr(exc)[:500])
        raise ApiError(502, "the audit service is unreachable") from exc
    response = web.StreamResponse(status=upstream.status)
    for name in ("Content-Type", "Cache-Control", "X-Accel-Buffering"):
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    try:
        await response.prepare(request)
        while (chunk := await _next_chunk(request, upstream)) is not None:
            await response.write(chunk)
        await response.write_eof()
    # The audit went away mid-answer (a stream's client resumes from its last id), or
    # the browser did: either way this answer ends here.
    except (aiohttp.ClientError, ConnectionResetError):
        pass
    finally:
        upstream.close()
    return response


async def _next_chunk(request: web.Request, upstream: aiohttp.ClientResponse) -> bytes | None:
    """The next bytes from the audit, or None once it ended or the browser went away."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return None
        try:
            chunk = await asyncio.wait_for(upstream.content.readany(), CLIENT_CHECK_S)
        except TimeoutError:
            continue
        return chunk or None


def add_console(app: web.Application, audit_url: str) -> None:
    """Serve the console and pass the audit's read routes through to `audit_url`."""
    app[AUDIT_URL] = audit_url.rstrip("/")
    app.add_routes(routes)
    for path in AUDIT_ROUTES:
        app.router.add_get(path, audit_pass_through)
