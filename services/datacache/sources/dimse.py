"""DIMSE sources: C-FIND to know a study, C-GET to fetch it, C-STORE for results.

`dimse://ORTHANC@pacs.example:4242/studies/<StudyUID>[/series/<SeriesUID>]`, our own AE
title from the configuration (`calling_aet`). C-GET rather than C-MOVE: the instances
come back on the association we opened, so the PACS never has to reach a storage SCP of
ours through the hospital's firewalls. Each instance is stored as the PACS sent it: the
encoded dataset byte for byte, behind a file meta header (DIMSE carries datasets, not
files, so the meta group is ours), under `<SeriesUID>/<SOPInstanceUID>.dcm`.

pynetdicom blocks, so each association runs in a worker thread; every instance it
receives is handed to the event loop with `run_coroutine_threadsafe(...).result()`,
which also slows the PACS down to the pace the cache can store at.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from services.datacache.sources.base import (
    FileSink,
    ResultFile,
    Source,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)

UID = r"[0-9]+(?:\.[0-9]+)*"
PATH = re.compile(rf"^/studies/(?P<study>{UID})(?:/series/(?P<series>{UID}))?/?$")
#: A C-GET association offers at most 128 contexts: the query model and 127 storage ones.
STORAGE_CONTEXTS = StoragePresentationContexts[:127]
TIMEOUT_S = 60


class DimseSource(Source):
    schemes = ("dimse",)

    def _target(self, ref: SourceRef) -> tuple[str, str, int, str, str | None]:
        aet, _, hostport = ref.netloc.rpartition("@")
        host, _, port = hostport.rpartition(":")
        match = PATH.match(ref.path)
        if not aet or not host or not port.isdigit() or match is None:
            raise SourceRefused(
                f"{ref.uri} is not a DIMSE study URI (dimse://AET@host:port/studies/<uid>)"
            )
        return aet, host, int(port), match["study"], match["series"]

    def canonical(self, ref: SourceRef) -> str:
        aet, host, port, study, series = self._target(ref)
        tail = f"/studies/{study}" + (f"/series/{series}" if series else "")
        return f"dimse://{aet}@{host.lower()}:{port}{tail}"

    @property
    def calling_aet(self) -> str:
        return self.config.calling_aet if self.config else "MEDHIVE"

    def _identifier(self, ref: SourceRef, listing: bool) -> Dataset:
        """A C-FIND of every instance (`listing`), or the C-GET of the study or series."""
        _, _, _, study, series = self._target(ref)
        query = Dataset()
        query.StudyInstanceUID = study
        if listing:
            query.QueryRetrieveLevel = "IMAGE"
            query.SeriesInstanceUID = series or ""
            query.SOPInstanceUID = ""
        elif series:
            query.QueryRetrieveLevel = "SERIES"
            query.SeriesInstanceUID = series
        else:
            query.QueryRetrieveLevel = "STUDY"
        return query

    def _associate(self, ae: AE, ref: SourceRef, **kwargs: Any) -> Any:
        """An established association, or the error that says why not."""
        aet, host, port, _, _ = self._target(ref)
        assoc = ae.associate(host, port, ae_title=aet, **kwargs)
        if assoc.is_established:
            return assoc
        name = self.canonical(ref)
        if assoc.is_rejected:
            # A rejection is the PACS's answer about who we are: it will not change by itself.
            raise SourceRefused(f"{name}: association rejected (calling AE {self.calling_aet!r})")
        raise SourceUnavailable(f"{name}: no association (PACS unreachable or aborted)")

    def _new_ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        return ae

    async def _reachable(self, ref: SourceRef) -> None:
        """A plain TCP connect first: a PACS that is down is told apart at once, and
        pynetdicom is spared a failed connect (it leaks that socket)."""
        _, host, port, _, _ = self._target(ref)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise SourceUnavailable(f"{self.canonical(ref)}: unreachable: {exc}") from exc
        writer.close()
        await writer.wait_closed()

    async def version(self, ref: SourceRef) -> str | None:
        await self._reachable(ref)
        uids = await asyncio.to_thread(self._find, ref)
        if not uids:
            raise SourceRefused(f"{self.canonical(ref)}: no such study in the PACS")
        return f"{len(uids)}:{hashlib.sha256(chr(0).join(sorted(uids)).encode()).hexdigest()[:16]}"

    def _find(self, ref: SourceRef) -> list[str]:
        ae = self._new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, ref)
        uids: list[str] = []
        try:
            for status, found in assoc.send_c_find(
                self._identifier(ref, listing=True), StudyRootQueryRetrieveInformationModelFind
            ):
                self._check(status, ref, "C-FIND", assoc)
                if found is not None and status.Status in (0xFF00, 0xFF01):
                    uids.append(str(found.SOPInstanceUID))
        finally:
            assoc.release()
        return uids

    def _check(self, status: Dataset, ref: SourceRef, operation: str, assoc: Any) -> None:
        if not status:  # no answer: the association ended on the way
            if assoc.is_established:
                # The PACS answered, but not with a status: how it refuses a request from
                # an AE it does not let query or retrieve (Orthanc does). A timeout or a
                # dropped connection aborts the association instead, and may pass.
                raise SourceRefused(
                    f"{self.canonical(ref)}: the PACS aborted {operation}; may calling AE "
                    f"{self.calling_aet!r} query and retrieve there?"
                )
            raise SourceUnavailable(f"{self.canonical(ref)}: {operation} got no answer")
        code = int(status.Status)
        if code not in (0x0000, 0xFF00, 0xFF01, 0xFE00) and not 0xB000 <= code <= 0xBFFF:
            raise SourceRefused(f"{self.canonical(ref)}: {operation} failed with 0x{code:04X}")

    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        await self._reachable(ref)
        loop = asyncio.get_running_loop()

        def store(path: str, data: bytes) -> None:
            asyncio.run_coroutine_threadsafe(sink.put(path, _once(data)), loop).result()

        count = await asyncio.to_thread(self._get, ref, store)
        if count == 0:
            raise SourceRefused(f"{self.canonical(ref)}: the PACS returned no instances")

    def _get(self, ref: SourceRef, store: Callable[[str, bytes], None]) -> int:
        ae = self._new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for context in STORAGE_CONTEXTS:
            syntax = str(context.abstract_syntax)
            ae.add_requested_context(syntax)
            roles.append(build_role(syntax, scp_role=True))
        received = 0
        failure: list[BaseException] = []

        def on_store(event: Any) -> int:
            nonlocal received
            try:
                data = event.encoded_dataset(include_meta=True)
                ds = event.dataset
                store(f"{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm", data)
                received += 1
                return 0x0000
            except BaseException as exc:  # reported after the association, not lost
                failure.append(exc)
                return 0xA700  # out of resources: the PACS stops sending

        assoc = self._associate(ae, ref, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        try:
            for status, _ in assoc.send_c_get(
                self._identifier(ref, listing=False), StudyRootQueryRetrieveInformationModelGet
            ):
                if failure:
                    break
                self._check(status, ref, "C-GET", assoc)
        finally:
            assoc.release()
        if failure:
            raise failure[0]
        return received

    async def upload(self, ref: SourceRef, files: list[ResultFile]) -> str:
        datasets: list[Dataset] = []
        for item in files:
            raw = b"".join([chunk async for chunk in item.open()])
            try:
                datasets.append(dcmread(DicomBytesIO(raw)))
            except Exception as exc:
                raise SourceRefused(f"result {item.path} is not a DICOM file: {exc}") from exc
        await self._reachable(ref)
        await asyncio.to_thread(self._store, ref, datasets)
        return f"stored {len(datasets)} instances at {self.canonical(ref)} (C-STORE)"

    def _store(self, ref: SourceRef, datasets: list[Dataset]) -> None:
        ae = self._new_ae()
        for uid in {str(ds.SOPClassUID) for ds in datasets}:
            ae.add_requested_context(uid, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets])
        assoc = self._associate(ae, ref)
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                self._check(status, ref, "C-STORE", assoc)
        finally:
            assoc.release()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
