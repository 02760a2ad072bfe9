"""XNAT sources: a scan (or experiment) resource, fetched as a zip and unpacked on the fly.

`xnat://xnat.example/projects/P/subjects/S/experiments/E/scans/N/resources/R` (also
without `scans/N`, for an experiment's own resource). The REST API is at `base_url` from
the configuration (`https://xnat.example/xnat`, say), or `https://<host>`.

Each fetch logs in once (`PUT /data/services/auth`, the answer is the JSESSIONID),
uses that session for every call and ends it (`DELETE /data/JSESSION`): the password
crosses the wire once, and no session is left open on the server. An XNAT alias token
works the same way: its alias and secret are the username and password.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from services.datacache.sources.base import (
    FileSink,
    ResultFile,
    Source,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
    http_error,
)
from services.datacache.sources.zipstream import ZipError, entries

NAME = r"[^/]+"
PATH = re.compile(
    rf"^(?:/data(?:/archive)?)?(?P<resource>/projects/{NAME}/subjects/{NAME}/experiments/{NAME}"
    rf"(?:/scans/{NAME})?/resources/{NAME})/?$"
)


class XnatSource(Source):
    schemes = ("xnat",)

    def _resource(self, ref: SourceRef) -> str:
        match = PATH.match(ref.path)
        if match is None or not ref.netloc:
            raise SourceRefused(
                f"{ref.uri} is not an XNAT resource URI (xnat://host/projects/P/subjects/S/"
                "experiments/E[/scans/N]/resources/R)"
            )
        return match["resource"]

    def canonical(self, ref: SourceRef) -> str:
        return f"xnat://{ref.netloc.lower()}{self._resource(ref)}"

    def _base(self, ref: SourceRef) -> str:
        if self.config is not None and self.config.base_url:
            return self.config.base_url.rstrip("/")
        return f"https://{ref.netloc}"

    @asynccontextmanager
    async def _session(self, ref: SourceRef) -> AsyncIterator[dict[str, str]]:
        """Log in, yield the headers that carry the session, log out."""
        base, name = self._base(ref), self.canonical(ref)
        config = self.config
        if config is None or config.username is None:
            raise SourceRefused(f"{name}: no XNAT credentials configured")
        form = {
            "username": config.username,
            "password": config.password.get_secret_value() if config.password else "",
        }
        ssl = config.verify_tls
        try:
            async with self.session.put(f"{base}/data/services/auth", data=form, ssl=ssl) as r:
                if r.status in (401, 403):
                    raise SourceRefused(f"{name}: XNAT refused the login of {config.username!r}")
                if r.status != 200:
                    raise http_error(r.status, f"{name} (login)")
                session = (await r.text()).strip()
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
        headers = {"Cookie": f"JSESSIONID={session}"}
        try:
            yield headers
        finally:
            try:
                async with self.session.delete(f"{base}/data/JSESSION", headers=headers, ssl=ssl):
                    pass
            except aiohttp.ClientError:
                pass  # the session expires on the server anyway

    async def _get(self, url: str, headers: dict[str, str], name: str) -> aiohttp.ClientResponse:
        try:
            response = await self.session.get(url, headers=headers, ssl=self.verify_tls)
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
        if response.status >= 400:
            response.release()
            raise http_error(response.status, name)
        return response

    async def _listing(self, ref: SourceRef, headers: dict[str, str]) -> list[dict[str, Any]]:
        """The resource's file listing: a row per file with its `Name`, `Size`, `URI`."""
        name, url = self.canonical(ref), self._base(ref) + "/data" + self._resource(ref)
        response = await self._get(f"{url}/files?format=json", headers, name)
        async with response:
            try:
                rows = (await response.json(content_type=None))["ResultSet"]["Result"]
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceRefused(f"{name}: XNAT's file listing is malformed") from exc
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise SourceRefused(f"{name}: XNAT's file listing is malformed")
        return rows

    async def version(self, ref: SourceRef) -> str | None:
        """A digest of the resource's file listing (names, sizes, digests): no download."""
        async with self._session(ref) as headers:
            rows = await self._listing(ref, headers)
        listing = sorted(
            f"{row.get('Name')}|{row.get('Size')}|{row.get('digest', '')}" for row in rows
        )
        return f"{len(listing)}:{hashlib.sha256(chr(0).join(listing).encode()).hexdigest()[:16]}"

    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        name, url = self.canonical(ref), self._base(ref) + "/data" + self._resource(ref)
        async with self._session(ref) as headers:
            # What the listing declares bounds what the zip may inflate to.
            declared = _declared_sizes(await self._listing(ref, headers))
            response = await self._get(f"{url}/files?format=zip", headers, name)
            async with response:
                count = 0
                chunks = response.content.iter_any()
                total = sum(declared.values()) if declared else None

                def listed(entry: str) -> int | None:
                    return declared.get(_file_path(entry))

                try:
                    async for entry, content in entries(chunks, listed, total):
                        await sink.put(_file_path(entry), content)
                        count += 1
                except ZipError as exc:
                    raise SourceRefused(f"{name}: {exc}") from exc
                except aiohttp.ClientError as exc:
                    raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
        if count == 0:
            raise SourceRefused(f"{name}: the resource holds no files")

    async def upload(self, ref: SourceRef, files: list[ResultFile]) -> str:
        """Create the resource (if it is not there yet) and PUT each file into it."""
        name, url = self.canonical(ref), self._base(ref) + "/data" + self._resource(ref)
        ssl = self.verify_tls
        async with self._session(ref) as headers:
            try:
                async with self.session.put(url, headers=headers, ssl=ssl) as r:
                    if r.status not in (200, 201, 409):  # 409: it exists already
                        raise http_error(r.status, f"{name} (create resource)")
                for item in files:
                    async with self.session.put(
                        f"{url}/files/{item.path}?inbody=true&overwrite=true",
                        data=item.open(),
                        headers=headers,
                        ssl=ssl,
                    ) as r:
                        if r.status not in (200, 201):
                            raise http_error(r.status, f"{name}/files/{item.path}")
            except aiohttp.ClientError as exc:
                raise SourceUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
        return f"uploaded {len(files)} files ({sum(f.size for f in files)} bytes) to {name}"


def _declared_sizes(rows: list[dict[str, Any]]) -> dict[str, int]:
    """File path under the resource -> size, for the listing's rows that give both."""
    sizes = {}
    for row in rows:
        path = _file_path(str(row.get("URI") or row.get("Name") or ""))
        try:
            sizes[path] = int(str(row.get("Size")))
        except ValueError:
            continue
    return sizes


def _file_path(entry: str) -> str:
    """A file's path under its resource, from a zip entry name or a listing URI."""
    _, found, path = entry.partition("/files/")
    return path if found else entry
