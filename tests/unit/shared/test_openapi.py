"""The OpenAPI documents of the three HTTP APIs: valid 3.1, every route, its roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate

from medhive.openapi import export_openapi
from services.audit.app import create_app as audit_app
from services.audit.settings import AuditSettings
from services.datacache.app import create_app as datacache_app
from services.datacache.settings import DatacacheSettings
from services.scheduler.app import create_app as scheduler_app
from services.scheduler.settings import SchedulerSettings
from shared.service import api_document
from tests.helpers import routes_of


def apps() -> dict[str, web.Application]:
    """Each service's app, as built (building does no I/O)."""
    return {
        "scheduler": scheduler_app(SchedulerSettings()),
        "audit": audit_app(AuditSettings()),
        "datacache": datacache_app(DatacacheSettings(master_key="k1:" + "A" * 43 + "=")),
    }


@pytest.mark.parametrize("service", ["scheduler", "audit", "datacache"])
def test_each_api_has_a_valid_openapi_document_of_every_route(service: str) -> None:
    app = apps()[service]
    document = api_document(app, service)
    validate(document)  # the OpenAPI 3.1 specification's own schema and rules
    documented = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    served = {(m, p.replace("{path:.+}", "{path}")) for m, p in routes_of(app)}
    elsewhere = {
        (route.method, resource.canonical)
        for resource in app.router.resources()
        for route in resource
        if getattr(route.handler, "outside_document", None)
    }
    assert documented == served - elsewhere - {("GET", "/v1/openapi.json")}
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation["x-medhive-roles"], operation["operationId"]
            assert {"401", "403"} <= set(operation["responses"])


def test_a_job_submission_is_described_by_the_model_the_handler_parses_with() -> None:
    document = api_document(apps()["scheduler"], "scheduler")
    submit: dict[str, Any] = document["paths"]["/v1/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobSpec"}
    spec = document["components"]["schemas"]["JobSpec"]
    command = spec["properties"]["command"]["anyOf"][0]
    assert (command["type"], command["maxItems"]) == ("array", 256)
    assert {"201", "200", "409", "415", "422"} <= set(submit["responses"])
    listing = document["paths"]["/v1/jobs"]["get"]
    limit = next(p for p in listing["parameters"] if p["name"] == "limit")
    assert (limit["in"], limit["schema"]["maximum"]) == ("query", 500)
    assert submit["x-medhive-roles"] == ["user", "operator"]


def test_schema_export_writes_the_documents_the_services_serve(tmp_path: Path) -> None:
    written = export_openapi(tmp_path)
    assert [p.name for p in written] == [
        "openapi-scheduler.json", "openapi-audit.json", "openapi-datacache.json"
    ]  # fmt: skip
    for path, (service, app) in zip(written, apps().items(), strict=True):
        assert json.loads(path.read_text())["paths"] == api_document(app, service)["paths"]
