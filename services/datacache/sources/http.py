"""Plain HTTP(S) sources: one file per URI, with auth headers from the configuration.

A download that breaks off is resumed with a Range request from where it stopped, when
the server says it serves ranges (`Accept-Ranges: bytes`) and the entity is the same
(`If-Range` with its ETag or Last-Modified); otherwise the try fails and the fetcher
starts it again.
"""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit, urlunsplit

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

CHUNK = 1 << 20
#: Range resumptions within one try, before the try counts as failed.
RESUMES = 5
DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpSource(Source):
    schemes = ("http", "https")

    def canonical(self, ref: SourceRef) -> str:
        parts = urlsplit(ref.uri)
        if parts.username or parts.password:
            raise SourceRefused(
                "credentials do not belong in a source URI; the datacache configuration holds them"
            )
        if not parts.hostname:
            raise SourceRefused(f"{ref.scheme} source URI has no host")
        scheme = parts.scheme.lower()
        host = parts.hostname.lower()
        if ":" in host:
            host = f"[{host}]"
        if parts.port and parts.port != DEFAULT_PORTS[scheme]:
            host = f"{host}:{parts.port}"
        return urlunsplit((scheme, host, parts.path or "/", parts.query, ""))

    async def version(self, ref: SourceRef) -> str | None:
        url = self.canonical(ref)
        try:
            async with self.request("HEAD", url) as r:
                if r.status in (405, 501):
                    return None  # no HEAD here; the content hash will tell
                if r.status >= 400:
                    raise http_error(r.status, url)
                tag = r.headers.get("ETag") or r.headers.get("Last-Modified")
                length = r.headers.get("Content-Length")
                return f"{tag}|{length}" if tag else None
        except aiohttp.ClientError as exc:
            raise SourceUnavailable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise SourceUnavailable(f"{url}: timed out") from exc

    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        url = self.canonical(ref)
        name = posixpath.basename(unquote(urlsplit(url).path)) or "data"
        await sink.put(name, self._body(url))

    async def _body(self, url: str) -> AsyncIterator[bytes]:
        """The entity's bytes, resumed by Range after a break when the server allows."""
        offset, validator, total, resumes, resumable = 0, None, None, 0, False
        while True:
            # The entity as served: no transfer compression for the client to undo.
            headers: dict[str, str] = {"Accept-Encoding": "identity"}
            if offset:
                headers |= {"Range": f"bytes={offset}-", "If-Range": validator or ""}
            try:
                async with self.request("GET", url, headers) as response:
                    if offset and response.status == 200:
                        raise SourceUnavailable(f"{url}: the entity changed while downloading")
                    if response.status not in (200, 206):
                        raise http_error(response.status, url)
                    if not offset:
                        validator = response.headers.get("ETag") or response.headers.get(
                            "Last-Modified"
                        )
                        resumable = response.headers.get("Accept-Ranges") == "bytes"
                        total = response.content_length
                    async for chunk in response.content.iter_any():
                        offset += len(chunk)
                        yield chunk
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError,
                    aiohttp.ClientOSError) as exc:  # fmt: skip
                if offset and resumable and validator and resumes < RESUMES:
                    resumes += 1
                    continue
                raise SourceUnavailable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
            except aiohttp.ClientError as exc:
                raise SourceUnavailable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
            if total is not None and offset < total:
                if resumable and validator and resumes < RESUMES:
                    resumes += 1
                    continue
                raise SourceUnavailable(f"{url}: ended after {offset} of {total} bytes")
            return

    async def upload(self, ref: SourceRef, files: list[ResultFile]) -> str:
        base = self.canonical(ref).rstrip("/")
        total = 0
        for item in files:
            url = f"{base}/{item.path}"
            try:
                async with self.request("PUT", url, data=item.open()) as response:
                    if response.status >= 300:
                        raise http_error(response.status, url)
            except aiohttp.ClientError as exc:
                raise SourceUnavailable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
            total += item.size
        return f"uploaded {len(files)} files ({total} bytes) to {base}/"
