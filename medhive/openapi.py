"""The OpenAPI documents of the three HTTP APIs, for `medhive schema export`.

Each is built from its service's route table, as the service itself builds the one it
serves at `/v1/openapi.json` (shared/openapi.py), without starting anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from shared.service import api_document


def openapi_documents() -> dict[str, dict[str, Any]]:
    """service -> its OpenAPI 3.1 document."""
    from services.audit.api import routes as audit
    from services.datacache.api import routes as datacache
    from services.scheduler.api import routes as scheduler

    documents = {}
    for service, routes in (("scheduler", scheduler), ("audit", audit), ("datacache", datacache)):
        app = web.Application()
        app.add_routes(routes)
        documents[service] = api_document(app, service)
    return documents


def export_openapi(directory: Path) -> list[Path]:
    """Write `openapi-<service>.json` for each API; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for service, document in openapi_documents().items():
        path = directory / f"openapi-{service}.json"
        path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written
