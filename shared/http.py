"""What every medhive HTTP API shares: JSON errors and bearer-token authentication.

Clients always get JSON: `{"error": {"status", "title", "detail"}}`. Handlers raise
`ApiError`; the middleware turns aiohttp's own HTTP errors (unknown route, wrong
method) into the same shape, and an unexpected exception into a 500 that leaks nothing.
"""

from __future__ import annotations

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
#: Paths that need no token (health checks from orchestrators).
PUBLIC_PATHS = frozenset({"/healthz"})

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
        return error_response(exc.status, exc.reason)
    except Exception:
        log.exception("http_handler_failed", path=request.path, method=request.method)
        return error_response(500, "internal error; the operator's logs have the details")


@web.middleware
async def auth_middleware(request: web.Request, handler: HandlerFn) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
    principal = await request.app[TOKENS].verify(token.strip())
    if principal is None:
        raise ApiError(401, "unknown or revoked token")
    request[PRINCIPAL] = principal
    with structlog.contextvars.bound_contextvars(tenant=principal.tenant, actor=principal.name):
        return await handler(request)


def require_role(request: web.Request, role: Role) -> Principal:
    """The caller, if it has `role`; 403 otherwise."""
    principal = request[PRINCIPAL]
    if principal.role != role:
        raise ApiError(403, f"this needs the {role.value} role")
    return principal


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse a JSON body into `model`: 400 for broken JSON, 422 naming each bad field."""
    raw = await request.read()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "problem": e["msg"]}
            for e in exc.errors()
        ]
        raise ApiError(422, "the request body is not valid", problems=problems) from exc


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi]; 400 otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ApiError(400, f"query parameter {name} must be an integer") from exc
    if not lo <= value <= hi:
        raise ApiError(400, f"query parameter {name} must be between {lo} and {hi}")
    return value
