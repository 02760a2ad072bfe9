"""What a careless or hostile client gets from the job API: a 4xx in the documented
JSON shape, never a 500, never another route (findings F1-F13 of the HTTP fuzzing)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.auth import Role
from shared.server import listen
from shared.settings import MongoSettings
from tests.helpers import bearer, make_token

JOB = {"name": "hello", "image": "medhive/busybox:1", "command": ["true"]}


async def _error(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert body["error"]["status"] == status
    return str(body["error"]["detail"])


async def test_bodies_that_break_the_parser_are_400(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """F1 (JSON nested 10,000 deep), F3 (a lone surrogate), an empty body."""
    auth = {**bearer(await make_token(mongo_settings, "radiology")),
            "Content-Type": "application/json"}  # fmt: skip
    for body in (
        "[" * 10_000 + "]" * 10_000,
        json.dumps({**JOB, "env": {"A": "x"}}).replace('"x"', '"\\udfff"'),
        "",
    ):
        detail = await _error(await scheduler.post("/v1/jobs", data=body, headers=auth), 400)
        assert "not valid JSON" in detail


async def test_values_the_store_or_the_engine_cannot_take_are_422_naming_the_field(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """F2 (NUL in a key), F4 (a CPU share below any limit), strict types."""
    auth = bearer(await make_token(mongo_settings, "radiology"))
    cases = {
        "env": {**JOB, "env": {"A\u0000B": "x"}},
        "labels": {**JOB, "labels": {"a\u0000": "x"}},
        "resources.cpus": {**JOB, "resources": {"cpus": 1e-10}},
        "walltime_s": {**JOB, "walltime_s": "3600"},
        "retries": {**JOB, "retries": True},
        "command": {**JOB, "command": ["x"] * 100_000},
    }
    for field, job in cases.items():
        response = await scheduler.post("/v1/jobs", json=job, headers=auth)
        await _error(response, 422)
        problems = (await response.json())["error"]["problems"]
        assert any(p["field"].startswith(field) for p in problems), (field, problems)


async def test_a_body_that_is_not_json_by_its_type_is_415(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        headers = {**auth, "Content-Type": content_type}
        response = await scheduler.post("/v1/jobs", data=json.dumps(JOB), headers=headers)
        await _error(response, 415)


async def test_an_output_path_reaches_only_the_jobs_own_listed_files(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """F5 (encoded `..` to another route of the datacache), F6 (a path it cannot take)."""
    auth = bearer(await make_token(mongo_settings, "radiology"))
    job = await (await scheduler.post("/v1/jobs", json=JOB, headers=auth)).json()
    for path in ("..%2f..%2f..%2f..%2fhealthz", f"..%2f..%2f{job['id']}%2finputs", "|" * 2000):
        response = await scheduler.get(f"/v1/jobs/{job['id']}/outputs/{path}", headers=auth)
        assert "no output" in await _error(response, 404)


async def test_tokens_that_are_no_text_are_401_and_other_roles_403(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """F11 (a token of raw bytes), F12 (a node's token on the job API), lowercase scheme."""
    # Raw bytes that are no UTF-8: only a socket sends those.
    reader, writer = await asyncio.open_connection(scheduler.host, scheduler.port)
    writer.write(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                 b"Connection: close\r\n\r\n")  # fmt: skip
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"]["status"] == 401
    node = bearer(await make_token(mongo_settings, "_nodes", Role.node, name="node-1"))
    for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/nodes")):
        response = await scheduler.request(method, path, json=JOB, headers=node)
        assert "user or operator" in await _error(response, 403)
    user = await make_token(mongo_settings, "radiology")
    lower = await scheduler.get("/v1/jobs", headers={"Authorization": f"bearer {user}"})
    assert lower.status == 200


async def test_a_method_a_route_lacks_is_405_saying_which_it_has(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """F13."""
    auth = bearer(await make_token(mongo_settings, "radiology"))
    for method in ("PUT", "TRACE"):
        response = await scheduler.request(method, "/v1/nodes", headers=auth)
        await _error(response, 405)
        assert "GET" in response.headers["Allow"]


async def test_a_page_cursor_that_is_no_job_id_is_400(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    auth = bearer(await make_token(mongo_settings, "radiology"))
    response = await scheduler.get("/v1/jobs", params={"before": "garbage"}, headers=auth)
    assert "before" in await _error(response, 400)


async def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send these) and read the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    return int(status_line.split()[1]), headers, body


async def test_requests_the_http_parser_refuses_get_the_json_shape(
    scheduler_settings: SchedulerSettings, mongo_settings: MongoSettings
) -> None:
    """F9: a URL or a header over 8 KB, raw non-ASCII bytes in the URL, and bytes that are
    not HTTP are refused by aiohttp's parser before any middleware; served as
    `python -m services.scheduler` serves, the answer is still medhive's JSON error."""
    listener = await listen(create_app(scheduler_settings), "127.0.0.1", 0)
    try:
        token = await make_token(mongo_settings, "radiology")
        auth = f"Authorization: Bearer {token}\r\n".encode()
        for request in (
            b"GET /v1/jobs?name=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
            b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Long: "
            + b"a" * 9000
            + b"\r\n"
            + auth
            + b"\r\n",
            "GET /v1/jobs/é HTTP/1.1\r\nHost: x\r\n".encode() + auth + b"\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
        ):
            status, headers, body = await _raw(listener.port, request)
            assert status == 400, body
            assert headers["content-type"].startswith("application/json")
            error = json.loads(body)["error"]
            assert error["status"] == 400 and "not well-formed HTTP" in error["detail"]
        # The same listener answers well-formed requests through the app as before.
        status, _, body = await _raw(
            listener.port,
            b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n",
        )
        assert status == 200, body
    finally:
        await listener.close()


async def test_a_query_parameter_the_route_does_not_take_is_400(
    scheduler: TestClient, mongo_settings: MongoSettings
) -> None:
    """A misspelt filter (`stat` for `state`) must not silently list every job."""
    auth = bearer(await make_token(mongo_settings, "radiology"))
    response = await scheduler.get("/v1/jobs", params={"stat": "queued"}, headers=auth)
    detail = await _error(response, 400)
    assert "'stat'" in detail and "state" in detail
