"""Plain HTTP(S) sources: one file per URI, with auth headers from the configuration.

The file's body is a `Download`: read by worker threads straight into the blob store's
buffers, and resumed by Range where it broke off (see `download`); when it cannot be
resumed, the try fails and the fetcher starts it again.
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from services.datacache.sources.base import (
    FileSink,
    ResultFile,
    Source,
    SourceError,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
    http_error,
)
from shared.download import DEFAULT_PORTS, Download, DownloadFailed


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
        # The body is read by worker threads, not the event loop (see `download`); the
        # session's read timeout is the fetch timeout the datacache configured.
        download = Download(
            url, self.credentials(), verify_tls=self.verify_tls,
            timeout_s=self.session.timeout.sock_read,
        )  # fmt: skip
        try:
            await sink.put(name, download)
        except DownloadFailed as exc:
            raise _source_error(url, exc) from exc
        finally:
            download.close()

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


def _source_error(url: str, failed: DownloadFailed) -> SourceError:
    """A download's failure as the fetcher takes it: worth retrying, or not."""
    if failed.status is not None:
        return http_error(failed.status, url, failed.said)
    return (SourceUnavailable if failed.passing else SourceRefused)(str(failed))
