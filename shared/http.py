"""What every medhive HTTP API shares: JSON errors and bearer-token authentication.

Clients always get JSON: `{"error": {"status", "title", "detail"}}`. Handlers raise
`ApiError`; the middleware turns aiohttp's own HTTP errors (unknown route, wrong
method) into the same shape, and an unexpected exception into a 500 that leaks nothing.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.auth import Principal, Role, TokenStore

log = structlog.get_logger("medhive.http")

M = TypeVar("M", bound=BaseModel)

PRINCIPAL = web.RequestKey("principal", Principal)
TOKENS = web.AppKey("tokens", TokenStore)
#: The largest JSON body a route reads (413 past it); streamed uploads have their own.
MAX_JSON_BODY_BYTES = 1024 * 1024
#: The longest request line or header line (400 past it): aiohttp's parser default.
MAX_LINE_BYTES = 8190
#: What every API's description says about these bounds.
LIMITS = (
    f"A JSON body holds at most {MAX_JSON_BODY_BYTES // 1024} KiB (413 past it); a "
    f"request line or a header at most {MAX_LINE_BYTES} bytes (400 past it). Every "
    "error, the parser's included, is `application/json` in the `ErrorResponse` shape."
)
#: Paths that need no token: health checks from orchestrators, the API's description.
PUBLIC_PATHS = frozenset({"/healthz", "/v1/openapi.json"})
#: The web console's static files (its page signs in with a token, for the API calls).
PUBLIC_PREFIX = "/ui"

#: Where every service serves its metrics; the only path a `metrics` token reaches.
METRICS_PATH = "/metrics"

HandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error a client can act on, with its HTTP status."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extra = extra


def error_response(status: int, detail: str, **extra: Any) -> web.Response:
    """The JSON body every error of every medhive API has."""
    body = {"error": {"status": status, "title": HTTPStatus(status).phrase, "detail": detail}}
    body["error"].update(extra)
    return web.json_response(body, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: HandlerFn) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.detail, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason)
        if "Allow" in exc.headers:  # a 405 says which methods the route has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("http_handler_failed", path=request.path, method=request.method)
        return error_response(500, "internal error; the operator's logs have the details")


@web.middleware
async def auth_middleware(request: web.Request, handler: HandlerFn) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or _is_console(request.path):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # The scheme is case-insensitive (RFC 9110); a token is printable ASCII.
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    token = token.strip()
    if not token.isascii() or not token.isprintable():
        raise ApiError(401, "unknown or revoked token")
    principal = await request.app[TOKENS].verify(token)
    if principal is None:
        raise ApiError(401, "unknown or revoked token")
    request[PRINCIPAL] = principal
    if principal.role == Role.metrics and request.path != METRICS_PATH:
        # Least privilege in one place: a scraper's token is refused everywhere else,
        # whether or not a route says which roles it serves.
        raise ApiError(403, f"a metrics token reads {METRICS_PATH} only")
    with structlog.contextvars.bound_contextvars(tenant=principal.tenant, actor=principal.name):
        return await handler(request)


def _is_console(path: str) -> bool:
    return path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/")


def require_role(request: web.Request, *roles: Role) -> Principal:
    """The caller, if it has one of `roles`; 403 otherwise."""
    principal = request[PRINCIPAL]
    if principal.role not in roles:
        names = " or ".join(role.value for role in roles)
        raise ApiError(403, f"this needs the {names} role")
    return principal


def roles(*allowed: Role) -> Callable[[HandlerFn], HandlerFn]:
    """Mark a route as reached by these roles only: a token of another role gets 403
    before the handler runs (a node's token reads no tenant's jobs, a user's no node's
    data). Every authenticated route says which roles it serves."""

    def mark(handler: HandlerFn) -> HandlerFn:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            require_role(request, *allowed)
            return await handler(request)

        checked.roles = allowed  # type: ignore[attr-defined]  # read by tests and docs
        return checked

    return mark


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse a JSON body into `model`: 415 for another content type, 400 for what is no
    JSON (nesting past the parser's depth, text that is no Unicode, NaN), 422 naming
    each bad field.

    Types are strict, as the OpenAPI document states them: `"3600"` or `true` where a
    number belongs is refused rather than guessed at; `76.0` is the integer 76, as JSON
    Schema has it.
    """
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as application/json")
    raw = await request.read()
    try:
        data = json.loads(raw, parse_float=_number, parse_constant=_no_constant)
        json.dumps(data, ensure_ascii=False).encode()  # a lone surrogate fails here
    except (ValueError, RecursionError, UnicodeError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise ApiError(400, f"body is not valid JSON: {reason}") from exc
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "problem": e["msg"]}
            for e in exc.errors()
        ]
        raise ApiError(422, "the request body is not valid", problems=problems) from exc


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an integer when it is one."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_query(request: web.Request, model: type[M]) -> M:
    """The query string as `model` (empty values count as absent): 400 naming each
    parameter that is wrong, and each the route does not take (a misspelt filter must
    not silently widen a listing)."""
    unknown = sorted(set(request.query) - set(model.model_fields))
    if unknown:
        known = ", ".join(model.model_fields) or "none"
        raise ApiError(
            400,
            f"unknown query parameter {', '.join(map(repr, unknown))} (this route takes: {known})",
        )
    data = {
        name: request.query[name]
        for name in model.model_fields
        if request.query.get(name, "") != ""
    }
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "query", "problem": e["msg"]}
            for e in exc.errors()
        ]
        names = ", ".join(dict.fromkeys(p["field"] for p in problems))
        raise ApiError(400, f"query parameter {names} is not valid", problems=problems) from exc
