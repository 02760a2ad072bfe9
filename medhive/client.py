"""A small client for the job API and the audit API, used by the CLI and the benches."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


class ApiFailure(Exception):
    """An API answered with an error; the message is its JSON `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def default_token() -> str | None:
    """`MEDHIVE_TOKEN`, or the file `medhive token create --save` wrote."""
    token = os.environ.get("MEDHIVE_TOKEN")
    if token:
        return token
    path = Path(os.environ.get("MEDHIVE_TOKEN_FILE", "~/.config/medhive/token")).expanduser()
    return path.read_text().strip() if path.exists() else None


class Client:
    def __init__(self, api_url: str, audit_url: str, token: str | None) -> None:
        self.api_url = api_url.rstrip("/")
        self.audit_url = audit_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(headers=headers)

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def call(self, method: str, url: str, **kwargs: Any) -> Any:
        async with self.session.request(method, url, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                error = (body or {}).get("error", {}) if isinstance(body, dict) else {}
                detail = error.get("detail", str(body))
                if "problems" in error:
                    detail += "".join(
                        f"\n  {p['field']}: {p['problem']}" for p in error["problems"]
                    )
                raise ApiFailure(response.status, detail)
            return body

    # -- jobs ---------------------------------------------------------------------

    async def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.call("POST", f"{self.api_url}/v1/jobs", json=spec))

    async def submit_many(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Many jobs in one request: one answer each (`status`, `job`, `detail`)."""
        body = await self.call("POST", f"{self.api_url}/v1/jobs/batch", json={"jobs": specs})
        return list(body["results"])

    async def job(self, job_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"{self.api_url}/v1/jobs/{job_id}"))

    async def jobs(
        self,
        state: str | None = None,
        limit: int = 50,
        name: str | None = None,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        params: dict[str, str | int] = {"limit": limit}
        for key, value in (("state", state), ("name", name), ("tenant", tenant)):
            if value:
                params[key] = value
        body = await self.call("GET", f"{self.api_url}/v1/jobs", params=params)
        return list(body["jobs"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(await self.call("DELETE", f"{self.api_url}/v1/jobs/{job_id}"))

    async def logs(self, job_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"{self.api_url}/v1/jobs/{job_id}/logs"))

    async def outputs(self, job_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"{self.api_url}/v1/jobs/{job_id}/outputs"))

    async def download(self, job_id: str, path: str, target: Path) -> str:
        """Stream one result file to `target`; returns the SHA-256 of what arrived."""
        digest = hashlib.sha256()
        url = f"{self.api_url}/v1/jobs/{job_id}/outputs/{path}"
        async with self.session.get(url) as response:
            if response.status >= 400:
                body = await response.json(content_type=None)
                raise ApiFailure(response.status, body["error"]["detail"])
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        return digest.hexdigest()

    async def nodes(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", f"{self.api_url}/v1/nodes"))["nodes"])

    async def tenants(self) -> dict[str, Any]:
        return dict(await self.call("GET", f"{self.api_url}/v1/tenants"))

    async def set_tenant(self, tenant: str, policy: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.call("PUT", f"{self.api_url}/v1/tenants/{tenant}", json=policy))

    # -- webhooks -----------------------------------------------------------------

    async def add_webhook(self, url: str, events: list[str]) -> dict[str, Any]:
        """Register a webhook; the answer has its signing secret, shown only then."""
        body = {"url": url, "events": events}
        return dict(await self.call("POST", f"{self.api_url}/v1/webhooks", json=body))

    async def webhooks(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", f"{self.api_url}/v1/webhooks"))["webhooks"])

    async def remove_webhook(self, webhook_id: str) -> dict[str, Any]:
        return dict(await self.call("DELETE", f"{self.api_url}/v1/webhooks/{webhook_id}"))

    async def test_webhook(self, webhook_id: str) -> dict[str, Any]:
        return dict(await self.call("POST", f"{self.api_url}/v1/webhooks/{webhook_id}/test"))

    # -- audit --------------------------------------------------------------------

    async def events(
        self, filters: dict[str, str], after: int = 0
    ) -> tuple[list[dict[str, Any]], Any]:
        params: dict[str, str | int] = {"after": after, "limit": 1000}
        params.update({k: v for k, v in filters.items() if v})
        body = await self.call("GET", f"{self.audit_url}/v1/events", params=params)
        return list(body["events"]), body["next_after"]

    async def verify(self) -> dict[str, Any]:
        return dict(await self.call("GET", f"{self.audit_url}/v1/audit/verify"))

    async def stream(
        self, filters: dict[str, str], after: int = 0
    ) -> AsyncGenerator[dict[str, Any]]:
        """Audit records as they are stored; reconnects after a drop, resuming at the
        last id seen, so nothing is missed and nothing is repeated."""
        last = after
        params = {k: v for k, v in filters.items() if v}
        while True:
            headers = {"Last-Event-ID": str(last)}
            try:
                async with self.session.get(
                    f"{self.audit_url}/v1/events/stream",
                    params=params,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
                ) as response:
                    if response.status >= 400:
                        body = await response.json(content_type=None)
                        raise ApiFailure(response.status, body["error"]["detail"])
                    async for event_id, data in parse_sse(response):
                        last = event_id
                        yield data
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError):
                continue  # resume from `last`


async def parse_sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Parse `text/event-stream`: `id:` and `data:` lines, an empty line ends an event."""
    event_id: int | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if event_id is not None and data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
