"""Which sources a tenant may use, with which credentials, through which source class.

A source URI is usable only when the configuration names it for the tenant: the list is
an allow-list as much as a credential store, so a job cannot make the datacache fetch
from an arbitrary host, and one tenant's credentials never serve another tenant's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml
from pydantic import TypeAdapter

from services.datacache.sources.base import Source, SourceConfig, SourceRef, SourceRefused
from services.datacache.sources.dicomweb import DicomWebSource
from services.datacache.sources.dimse import DimseSource
from services.datacache.sources.http import HttpSource
from services.datacache.sources.storescp import StorageReceiver
from services.datacache.sources.xnat import XnatSource

SOURCE_CLASSES: dict[str, type[Source]] = {
    scheme: cls
    for cls in (HttpSource, XnatSource, DicomWebSource, DimseSource)
    for scheme in cls.schemes
}

_CONFIGS = TypeAdapter(list[SourceConfig])


def _matches(prefix: str, uri: str) -> bool:
    """`prefix` covers `uri` up to a path boundary (so `https://a.org` is not `https://a.org.evil`)."""
    scheme, _, rest = prefix.partition("://")
    uri_scheme, _, uri_rest = uri.partition("://")
    if scheme.lower() != uri_scheme.lower():
        return False
    host, _, path = rest.partition("/")
    uri_host, _, uri_path = uri_rest.partition("/")
    if host.lower() != uri_host.lower():
        return False
    path = path.rstrip("/")
    return not path or uri_path == path or uri_path.startswith(path + "/")


@dataclass(frozen=True)
class SourceDirectory:
    """The configured sources; `open` picks the longest matching entry for the tenant."""

    configs: tuple[SourceConfig, ...] = ()
    #: The storage SCP that C-MOVE retrievals arrive at, when the datacache runs one.
    receiver: StorageReceiver | None = None

    @classmethod
    def from_file(cls, path: Path | None) -> SourceDirectory:
        if path is None:
            return cls()
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if isinstance(data, dict):
            data = data.get("sources", [])
        return cls(tuple(_CONFIGS.validate_python(data or [])))

    def config_for(self, tenant: str, uri: str) -> SourceConfig:
        candidates = [c for c in self.configs if c.tenant == tenant and _matches(c.match, uri)]
        if not candidates:
            raise SourceRefused(f"no source configured for tenant {tenant!r} covers {uri}")
        return max(candidates, key=lambda c: len(c.match))

    def open(
        self,
        tenant: str,
        uri: str,
        session: aiohttp.ClientSession,
        transfer_syntax: str | None = None,
    ) -> tuple[Source, SourceRef]:
        """The source object for one URI of one tenant, or `SourceRefused` saying why not."""
        ref = SourceRef(uri, transfer_syntax)
        cls = SOURCE_CLASSES.get(ref.scheme)
        if cls is None:
            known = ", ".join(sorted(SOURCE_CLASSES))
            raise SourceRefused(f"unknown source scheme {ref.scheme!r} (known: {known})")
        if transfer_syntax is not None and not cls.converts_dicom:
            raise SourceRefused(
                f"a transfer syntax can be asked of DICOM sources, not {ref.scheme}"
            )
        return cls(self.config_for(tenant, uri), session, self.receiver), ref
