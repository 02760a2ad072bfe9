"""OpenAPI 3.1 documents of medhive's HTTP APIs, built from the routes themselves.

Each route's handler carries what the document says of it: the roles that reach it
(`shared.http.roles`) and its `Endpoint`, whose query, body and response are the very
pydantic models the handler parses with (`read_query`, `read_model`) and answers with.
So the document cannot drift from the code: there is no hand-kept YAML. Every service
serves its own at `/v1/openapi.json` (no token needed), and `medhive schema export`
writes all three beside the AsyncAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from shared.identity import NAME_PATTERN

OPENAPI_VERSION = "3.1.0"
#: Where every service serves its document.
OPENAPI_PATH = "/v1/openapi.json"
_PARAMETER = re.compile(r"\{(\w+)\}")
#: Path parameters whose values are checked against a pattern (the rest: any string).
PATH_SCHEMAS: dict[str, dict[str, Any]] = {"tenant": {"type": "string", "pattern": NAME_PATTERN}}
F = TypeVar("F", bound=Callable[..., Any])


class ErrorBody(BaseModel):
    """What every error of every medhive API says."""

    status: int = Field(description="The HTTP status, again.")
    title: str = Field(description="Its standard phrase.")
    detail: str = Field(description="What is wrong, for a person.")
    problems: list[dict[str, str]] | None = Field(
        None, description="For a 422: each field (`field`) and what is wrong with it (`problem`)."
    )


class ErrorResponse(BaseModel):
    error: ErrorBody


@dataclass(frozen=True)
class Endpoint:
    """What the OpenAPI document says of one route."""

    summary: str
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    #: A body that may be left out altogether (`DELETE /v1/jobs/{id}`).
    body_optional: bool = False
    #: A request body that is raw bytes rather than JSON (results a node stores).
    raw_body: bool = False
    response: type[BaseModel] | None = None
    status: int = 200
    #: Other success statuses with the same body (an idempotent repeat's 200).
    also: tuple[int, ...] = ()
    #: The success media type when it is not JSON: a file, or server-sent events.
    media: str = "application/json"
    #: Errors the route itself may answer, besides 401 and 403 (every route's).
    errors: tuple[int, ...] = ()
    #: Request headers the route reads: name -> description.
    headers: dict[str, str] = field(default_factory=dict)
    #: The roles that reach it, where the handler checks them itself (and records a
    #: refusal) rather than through `shared.http.roles`.
    roles: tuple[str, ...] = ()
    #: Operations (by id) that take the `id` of this answer as their `job_id`: the links
    #: a client, or a stateful fuzzer, follows from a job it made.
    links: tuple[str, ...] = ()


def outside_document(why: str) -> Callable[[F], F]:
    """Mark a route the document leaves out on purpose, and say why: a web page's
    files, or another service's routes answered here (described in its own document)."""

    def mark(handler: F) -> F:
        handler.outside_document = why  # type: ignore[attr-defined]  # read by the tests
        return handler

    return mark


def endpoint(**fields: Any) -> Callable[[F], F]:
    """Describe a route for the OpenAPI document (see `Endpoint`)."""
    described = Endpoint(**fields)

    def mark(handler: F) -> F:
        handler.endpoint = described  # type: ignore[attr-defined]  # read by the builder
        return handler

    return mark


class KeysByName(GenerateJsonSchema):
    """pydantic's JSON Schema, except for mappings whose keys have a pattern.

    pydantic writes `dict[Key, Value]` as `patternProperties`, under which a key that
    misses the pattern is an additional property with any value: the document would
    promise to accept what the API refuses (a label key with a NUL). Here the key's
    pattern goes to `propertyNames` and the values to `additionalProperties`, which is
    what the model checks.
    """

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        json_schema = super().dict_schema(schema)
        patterns = json_schema.get("patternProperties") or {}
        if len(patterns) == 1 and "additionalProperties" not in json_schema:
            ((pattern, values),) = patterns.items()
            del json_schema["patternProperties"]
            names = json_schema.get("propertyNames", {})
            json_schema["propertyNames"] = {**names, "pattern": pattern}
            json_schema["additionalProperties"] = values
        return json_schema


def openapi_document(app: web.Application, title: str, description: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every described route of `app`."""
    routes: list[tuple[str, str, Any]] = [
        (resource.canonical, route.method.lower(), route.handler)
        for resource in app.router.resources()
        for route in resource
        # aiohttp answers HEAD for every GET by itself: the GET describes both
        if route.method != "HEAD" and getattr(route.handler, "endpoint", None) is not None
    ]
    models: list[type[BaseModel]] = [ErrorResponse]
    for _, _, handler in routes:
        described: Endpoint = handler.endpoint
        models += [m for m in (described.query, described.body, described.response) if m]
    refs, top = models_json_schema(
        [(model, "validation") for model in dict.fromkeys(models)],
        ref_template="#/components/schemas/{model}",
        schema_generator=KeysByName,
    )
    schemas = {model: refs[(model, "validation")] for model in dict.fromkeys(models)}
    components = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for path, method, handler in sorted(routes, key=lambda r: (r[0], r[1])):
        operation = _operation(path, method, handler, schemas, components)
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": _version(), "description": description},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `medhive token create`, bound to a tenant "
                    "and a role (`user`, `operator`, `node`); `x-medhive-roles` on each "
                    "operation says which roles reach it (any other gets 403).",
                }
            },
        },
    }


def _operation(
    path: str,
    method: str,
    handler: Any,
    schemas: dict[type[BaseModel], Any],
    components: dict[str, Any],
) -> dict[str, Any]:
    described: Endpoint = handler.endpoint
    roles = [str(role) for role in getattr(handler, "roles", described.roles)]
    operation: dict[str, Any] = {
        "operationId": handler.__name__,
        "summary": described.summary,
        "security": [{"bearer": []}],  # every described route; the public ones are not
        "parameters": _parameters(path, described, components),
        "x-medhive-roles": roles,
    }
    if described.body is not None:
        operation["requestBody"] = {
            "required": not described.body_optional,
            "content": {"application/json": {"schema": schemas[described.body]}},
        }
    elif described.raw_body:
        binary = {"type": "string", "contentMediaType": "application/octet-stream"}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": binary}},
        }
    success = _content(described, schemas)
    responses: dict[str, Any] = {
        str(status): {"description": HTTPStatus(status).phrase, "content": success}
        for status in (described.status, *described.also)
    }
    if described.links:
        responses[str(described.status)]["links"] = {
            target: {"operationId": target, "parameters": {"job_id": "$response.body#/id"}}
            for target in described.links
        }
    errors = {*described.errors, 401, 403}
    if described.query is not None or _PARAMETER.search(path):
        errors.add(400)
    if described.body is not None:
        errors |= {400, 413, 415, 422}
    error = {"application/json": {"schema": schemas[ErrorResponse]}}
    for status in sorted(errors):
        responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": error}
    operation["responses"] = responses
    return operation


def _content(described: Endpoint, schemas: dict[type[BaseModel], Any]) -> dict[str, Any]:
    if described.response is not None:
        return {"application/json": {"schema": schemas[described.response]}}
    if described.media == "text/event-stream":
        return {"text/event-stream": {"schema": {"type": "string"}}}
    binary = {"type": "string", "contentMediaType": described.media}
    return {described.media: {"schema": binary}}


def _parameters(path: str, described: Endpoint, components: dict[str, Any]) -> list[dict[str, Any]]:
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": PATH_SCHEMAS.get(name, {"type": "string"}),
        }
        for name in _PARAMETER.findall(path)
    ]
    if described.query is not None:
        # The query model's own entry in `components`, whose references resolve there.
        properties = components[described.query.__name__]["properties"]
        for name, info in described.query.model_fields.items():
            schema = dict(properties[name])
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": info.is_required(),
                    "description": schema.pop("description", ""),
                    "schema": schema,
                }
            )
    for name, text in described.headers.items():
        schema = {"type": "string"}
        parameters.append({"name": name, "in": "header", "description": text, "schema": schema})
    return parameters


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("medhive")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
