"""One HTTP(S) GET whose body is read by worker threads, straight into the reader's memory.

The datacache stages an HTTP source's file this way, and a node fetches a large input
so. Staging a file through aiohttp's client meant about 14,000 chunks of 64 KiB per GiB,
each handed over by the event loop and copied into the blob store's batch buffer: that
was the slowest stage of staging (0.8 s of the event loop's CPU per GiB, against 0.3 s
for the kernel's own copy), and every chunk took the GIL back from the threads hashing
and sealing. A `Download` is read with blocking `readinto` calls (`http.client`), a
batch of 4 MiB per call, into the blob store's buffers (`BlobStore.write_from`): the
kernel copies each byte once, into its place, with the GIL released. Measured on this
machine against the bench's origin: 0.28 CPU s per GiB, against 0.48 to 0.65 for
aiohttp's chunks copied into a buffer.

The request is the one the aiohttp client made: the configured credentials,
`Accept-Encoding: identity`, redirects followed (credentials go only to the origin
they were configured for), a timeout on connecting and on every read, and a body that
breaks off resumed by Range from where it stopped when the server serves ranges
(`Accept-Ranges: bytes`) and the entity is the same (`If-Range` with its ETag or
Last-Modified). A body sent encoded although identity was asked for is refused: the
cache stores the entity's own bytes, and their digest is what a job is promised.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import ssl
from collections.abc import AsyncIterator
from http.client import HTTPConnection, HTTPException, HTTPResponse, HTTPSConnection
from typing import Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

from shared.threadio import interruptible

#: Range resumptions within one try, before the try counts as failed.
RESUMES = 5
#: Redirects followed before the source counts as misconfigured (as aiohttp's client).
REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Bytes per read when the body is iterated rather than read into a buffer.
CHUNK = 1 << 20
DEFAULT_PORTS = {"http": 80, "https": 443}
CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)$")
#: Characters of an error answer's body kept for the message.
SAID_CHARS = 300


class ReadsInto(Protocol):
    """What reads into memory it is given (blocking): a `Download`, a file."""

    def readinto(self, view: memoryview) -> int:
        """The next bytes into `view`: how many; 0 at the end."""
        ...


class DownloadFailed(Exception):
    """The download failed; the message names the URL and says why. `status`: the HTTP
    status it was refused with (and `said`, the start of the answer's body), else None;
    `passing`: whether trying again may help (a break, a timeout), when no status says."""

    def __init__(self, message: str, status: int | None = None, said: str = "",
                 passing: bool = True) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.said, self.passing = status, said, passing


class Download:
    """The body of `url`, read with `readinto` from worker threads (blocking), one
    thread at a time; `abort` may be called from any thread. Nothing is sent until the
    first read, so connecting and its errors happen in the reader's thread too."""

    def __init__(
        self, url: str, credentials: dict[str, str], *, verify_tls: bool, timeout_s: float | None
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        #: Body bytes read so far (where a resumption starts).
        self.offset = 0
        #: The body's length, when the server said it.
        self.total: int | None = None
        self._credentials = credentials
        self._verify_tls = verify_tls
        self._validator: str | None = None
        self._resumable = False
        self._resumes = 0
        self._connection: HTTPConnection | None = None
        self._response: HTTPResponse | None = None
        self._ended = self._aborted = False

    def open(self) -> None:
        """Send the request and check the answer (blocking), unless that is done."""
        if self._response is None and not self._ended:
            self._open()

    def header(self, name: str) -> str | None:
        """A header of the answer (once open)."""
        return self._response.getheader(name) if self._response is not None else None

    def readinto(self, view: memoryview) -> int:
        """The body's next bytes into `view`: how many (0 at its end). Raises
        `DownloadFailed`."""
        while not self._ended:
            response = self._response or self._open()
            try:
                got = response.readinto(view)
            except (OSError, HTTPException) as exc:
                self._resume_or_fail(f"{type(exc).__name__}: {exc}")
                continue
            if got:
                self.offset += got
                return got
            if self.total is not None and self.offset < self.total:
                self._resume_or_fail(f"ended after {self.offset} of {self.total} bytes")
                continue
            self._ended = True
            self.close()
        return 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """The body in chunks, for a sink that takes chunks rather than a reader."""
        buffer = bytearray(CHUNK)
        while got := await interruptible(lambda: self.readinto(memoryview(buffer)), self.abort):
            yield bytes(buffer[:got])

    def abort(self) -> None:
        """Make a read that waits on the network return now, and any later one fail."""
        self._aborted = True
        connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown, also under TLS: the reading thread owns
                # the TLS state, and this only makes its `recv` return.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection (once no thread reads any more)."""
        connection, self._connection, self._response = self._connection, None, None
        if connection is not None:
            connection.close()

    def _open(self) -> HTTPResponse:
        """Send the GET (with Range when resuming), follow redirects, check the answer."""
        headers = {**self._credentials, "Accept-Encoding": "identity"}
        if self.offset:
            headers |= {"Range": f"bytes={self.offset}-", "If-Range": self._validator or ""}
        url = self.url
        for _ in range(REDIRECTS + 1):
            response = self._request(url, headers)
            location = response.getheader("Location")
            if response.status not in REDIRECT_STATUSES or not location:
                break
            self.close()
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise DownloadFailed(f"{self.url}: redirected to {target!r}", passing=False)
            if _origin(target) != _origin(url):  # the credentials stay with their origin
                headers = {k: v for k, v in headers.items() if k not in self._credentials}
            url = target
        else:
            self.close()
            raise DownloadFailed(f"{self.url}: more than {REDIRECTS} redirects", passing=False)
        self._check(response)
        return response

    def _request(self, url: str, headers: dict[str, str]) -> HTTPResponse:
        if self._aborted:
            raise DownloadFailed(f"{self.url}: the download was stopped")
        parts = urlsplit(url)
        connection = (
            HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self.timeout_s,
                context=_tls(self._verify_tls),
            )
            if parts.scheme == "https"
            else HTTPConnection(parts.hostname or "", parts.port, timeout=self.timeout_s)
        )  # fmt: skip
        self._connection = connection
        try:
            connection.request("GET", urlunsplit(("", "", parts.path or "/", parts.query, "")),
                               headers=headers)  # fmt: skip
            self._response = connection.getresponse()
        except (OSError, HTTPException) as exc:
            self.close()
            raise DownloadFailed(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        return self._response

    def _check(self, response: HTTPResponse) -> None:
        """Refuse an answer that is not this entity's body (from `offset` on)."""
        status = response.status
        if self.offset and status == 200:
            self.close()
            raise DownloadFailed(f"{self.url}: the entity changed while downloading")
        if status not in (200, 206):
            said = response.read(SAID_CHARS * 4).decode(errors="replace")
            self.close()
            said = " ".join(said.split())[:SAID_CHARS]
            raise DownloadFailed(f"{self.url} answered HTTP {status}", status, said)
        if status == 206:
            found = CONTENT_RANGE.match(response.getheader("Content-Range", ""))
            if found is None or int(found.group(1)) != self.offset:
                self.close()
                raise DownloadFailed(f"{self.url}: the range sent is not the one asked for")
        encoding = response.getheader("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            self.close()
            raise DownloadFailed(
                f"{self.url}: the body came encoded ({encoding}) although identity was asked for",
                passing=False,
            )
        if not self.offset:
            self._validator = response.getheader("ETag") or response.getheader("Last-Modified")
            self._resumable = response.getheader("Accept-Ranges") == "bytes"
            self.total = response.length

    def _resume_or_fail(self, reason: str) -> None:
        """After a break: resume where the body stopped, if the server allows and the
        resumptions are not used up; else the try fails."""
        self.close()
        if self._aborted:
            raise DownloadFailed(f"{self.url}: the download was stopped")
        if self._resumable and self._validator and self._resumes < RESUMES:
            self._resumes += 1
            return
        raise DownloadFailed(f"{self.url}: {reason}")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme)


@functools.cache
def _tls(verify: bool) -> ssl.SSLContext:
    """The TLS context: the system's trust store, or (when the source's configuration
    says so) no verification at all. Built once: loading the trust store takes time."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
