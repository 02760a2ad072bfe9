"""What every data source does: resolve a URI to a version, fetch its files, upload results.

A source never stores anything itself: it hands each file to a `FileSink` as a stream
of chunks, and the sink encrypts it into the object store as it arrives. Retrying is
not a source's business either: a source raises `SourceUnavailable` for what may pass
(connection refused, timeout, 5xx) and `SourceRefused` for what will not (401, 403,
404, a malformed answer); the fetcher retries the first with backoff, the second never.
Credentials come from the datacache's configuration (`SourceConfig`), never from a job.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr

# The errors have their own module, which the storage SCP imports too: re-exported.
from services.datacache.sources.errors import SourceError as SourceError
from services.datacache.sources.errors import SourceRefused as SourceRefused
from services.datacache.sources.errors import SourceUnavailable as SourceUnavailable
from services.datacache.sources.errors import http_error as http_error

if TYPE_CHECKING:
    from services.datacache.sources.storescp import StorageReceiver


class SourceConfig(BaseModel):
    """How the datacache reaches one source for one tenant (from its configuration file).

    `match` is the start of the source URIs it applies to, such as
    `xnat://xnat.example` or `dimse://ORTHANC@pacs.example:4242`. The longest match wins.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tenant: str
    match: str
    base_url: str | None = Field(
        None,
        description="Where the source's HTTP API really is, when it differs from the URI "
        "(for example `https://xnat.example/xnat`, or plain http inside a test network).",
    )
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="Bearer token.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Extra headers.")
    calling_aet: str = Field("MEDHIVE", description="Our AE title towards a DIMSE peer.")
    retrieve: Literal["get", "move"] = Field(
        "get",
        description="DIMSE: C-GET (the instances come back on our association), or C-MOVE "
        "to `calling_aet` (the PACS connects to the datacache's storage SCP, "
        "`MEDHIVE_DATACACHE_DIMSE_LISTEN`; the PACS must know that AE's address).",
    )
    verify_tls: bool = True

    def http_headers(self) -> dict[str, str]:
        """Extra headers, and Authorization: bearer token, else basic with username."""
        headers = {name: value.get_secret_value() for name, value in self.headers.items()}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token.get_secret_value()}"
        elif self.username is not None:
            password = self.password.get_secret_value() if self.password else ""
            pair = base64.b64encode(f"{self.username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        return headers


@dataclass(frozen=True)
class SourceRef:
    """A source URI as a job names it, split once, with the form the job asked for."""

    uri: str
    #: DICOM only: the transfer syntax the archive is asked to convert to (None: as held).
    transfer_syntax: str | None = None

    @property
    def scheme(self) -> str:
        return urlsplit(self.uri).scheme.lower()

    @property
    def netloc(self) -> str:
        """`host[:port]` (for dimse: `AET@host:port`), as written."""
        return urlsplit(self.uri).netloc

    @property
    def path(self) -> str:
        return urlsplit(self.uri).path


class FileSink(Protocol):
    """Where a source puts what it fetched: one call per file, in any order.

    `path` is relative (no leading slash, no `..`): where the file appears under the
    input's directory in the workload. Awaiting `put` returns when the file is stored,
    which gives a threaded source its backpressure. The chunks may also be read into a
    buffer (`blobs.Readable`, as an HTTP `Download` is): a sink that can, does so.
    """

    async def put(self, path: str, chunks: AsyncIterable[bytes]) -> None: ...


#: A factory of a file's content, so an upload can be retried from the start.
OpenFile = Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True)
class ResultFile:
    """One output file to upload to a destination."""

    path: str  # relative, as under /outputs
    size: int
    open: OpenFile


class Source(ABC):
    """One kind of source; an instance serves one fetch or upload with one config."""

    schemes: ClassVar[tuple[str, ...]]
    #: Whether the source can ask its archive for another DICOM transfer syntax.
    converts_dicom: ClassVar[bool] = False

    def __init__(
        self,
        config: SourceConfig | None,
        session: aiohttp.ClientSession,
        receiver: StorageReceiver | None = None,
    ) -> None:
        self.config = config
        self.session = session
        #: Where a PACS sends what a C-MOVE retrieves (DIMSE sources only).
        self.receiver = receiver

    def request(
        self, method: str, url: str, headers: dict[str, str] | None = None, data: object = None
    ) -> aiohttp.client._RequestContextManager:
        """An HTTP request with the configured credentials (never logged, never in a URI)."""
        return self.session.request(
            method,
            url,
            headers={**self.credentials(), **(headers or {})},
            ssl=self.verify_tls,
            data=data,
        )

    def credentials(self) -> dict[str, str]:
        """The headers that carry the configured credentials (none without a config)."""
        return self.config.http_headers() if self.config else {}

    @property
    def verify_tls(self) -> bool:
        return self.config.verify_tls if self.config else True

    @abstractmethod
    def canonical(self, ref: SourceRef) -> str:
        """The URI in one spelling (case of scheme and host, no trailing slash...), so
        that two jobs naming the same data in two spellings share one cached copy.
        Raises `SourceRefused` when the URI does not name something this source serves.
        """

    async def version(self, ref: SourceRef) -> str | None:
        """A cheap probe of what the source holds now (ETag, Last-Modified, instance
        count, file list digest); None when the source tells nothing. Must not download
        the data: a second job on the same input costs no source bytes."""
        return None

    @abstractmethod
    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        """Fetch every file that `ref` names into `sink`."""

    async def upload(self, ref: SourceRef, files: list[ResultFile]) -> str:
        """Upload result files to the destination `ref` names; returns a short summary
        for the job's history. Sources that cannot receive data refuse."""
        raise SourceRefused(f"{ref.scheme} sources do not accept uploads")
