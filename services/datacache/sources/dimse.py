"""DIMSE sources: C-FIND to know a study, C-GET or C-MOVE to fetch it, C-STORE for results.

`dimse://ORTHANC@pacs.example:4242/studies/<StudyUID>[/series/<SeriesUID>]`, our own AE
title from the configuration (`calling_aet`). C-GET by default: the instances come back
on the association we opened, so the PACS never has to reach us through the hospital's
firewalls. C-MOVE (`retrieve: move`) for archives that allow only it: the PACS sends to
the datacache's storage SCP (`storescp.py`). Each instance is stored as the PACS sent
it: the encoded dataset byte for byte, behind a file meta header (DIMSE carries
datasets, not files, so the meta group is ours), under `<SeriesUID>/<SOPInstanceUID>.dcm`.

An instance keeps the transfer syntax the archive holds it in. Over C-GET we propose
the contexts the PACS sends on, so we offer, for each SOP class the IMAGE-level C-FIND
reports, the syntaxes it reports (Available Transfer Syntax UID), or every syntax when
it reports none (as Orthanc), each in a context of its own: the PACS then finds the
syntax it holds and sends it unconverted. A request carries at most 128 contexts, so
a study with more (SOP class, syntax) pairs is retrieved over several associations, by
lists of instance UIDs. A study is staged only whole: every instance the C-FIND listed,
or a source error that says how many came and why. An input that names a
`transfer_syntax` is offered only that syntax: the archive converts, or refuses.

pynetdicom blocks, so each association runs in a worker thread; every instance it
receives is handed to the event loop with `run_coroutine_threadsafe(...).result()`,
which also slows the PACS down to the pace the cache can store at.

One module because C-FIND, C-GET, C-MOVE and C-STORE are one `DimseSource` talking to
one PACS: they share the parsing of its URI (`_target`), the association under our AE
title with its rejection handling (`_associate`), and the status check that tells a
refusal from an outage (`_check`); and a retrieval is planned from the C-FIND's listing.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from services.datacache.sources.base import (
    FileSink,
    ResultFile,
    Source,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.storescp import Expected, StoreFn

UID = r"[0-9]+(?:\.[0-9]+)*"
PATH = re.compile(rf"^/studies/(?P<study>{UID})(?:/series/(?P<series>{UID}))?/?$")
#: A C-GET association offers at most 128 contexts: the query model and 127 storage ones.
MAX_STORAGE_CONTEXTS = 127
TIMEOUT_S = 60
#: Statuses of a C-FIND, C-GET or C-MOVE that say "more to come" or "done".
PENDING, SUCCESS = (0xFF00, 0xFF01), 0x0000


@dataclass(frozen=True)
class Instance:
    """One instance as the C-FIND lists it."""

    uid: str
    series: str
    sop_class: str
    #: What the PACS says it can send it in (empty when it does not say).
    syntaxes: tuple[str, ...] = ()


@dataclass
class Batch:
    """Instances retrieved over one association, and the contexts it proposes."""

    contexts: list[tuple[str, str]]  # (SOP class, transfer syntax)
    instances: list[Instance]


def plan_batches(instances: list[Instance], transfer_syntax: str | None) -> list[Batch]:
    """Group the instances by SOP class into associations of at most 127 storage
    contexts, one context per (SOP class, transfer syntax) the PACS may send."""
    wanted: dict[str, dict[str, None]] = {}
    for item in instances:
        if transfer_syntax is not None:
            syntaxes: tuple[str, ...] = (transfer_syntax,)
        else:
            syntaxes = item.syntaxes or tuple(ALL_TRANSFER_SYNTAXES)
        wanted.setdefault(item.sop_class, {}).update(dict.fromkeys(syntaxes))
    batches: list[Batch] = []
    classes: dict[str, Batch] = {}
    for sop_class, offered in sorted(wanted.items()):
        pairs = [(sop_class, syntax) for syntax in offered][:MAX_STORAGE_CONTEXTS]
        if not batches or len(batches[-1].contexts) + len(pairs) > MAX_STORAGE_CONTEXTS:
            batches.append(Batch([], []))
        batches[-1].contexts.extend(pairs)
        classes[sop_class] = batches[-1]
    for item in instances:
        classes[item.sop_class].instances.append(item)
    return batches


@dataclass
class Request:
    """One batch and the C-GET or C-MOVE identifiers that retrieve its instances."""

    batch: Batch
    identifiers: list[Dataset]


@dataclass
class Outcome:
    """What one retrieval brought: instances stored, and what the PACS reported failed."""

    received: set[str]
    failed: int = 0
    failed_uids: tuple[str, ...] = ()


class DimseSource(Source):
    schemes = ("dimse",)
    converts_dicom = True

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
        converted = f"?transfer-syntax={ref.transfer_syntax}" if ref.transfer_syntax else ""
        return f"dimse://{aet}@{host.lower()}:{port}{tail}{converted}"

    @property
    def calling_aet(self) -> str:
        return self.config.calling_aet if self.config else "MEDHIVE"

    def _identifier(self, ref: SourceRef, level: str, uids: list[str] | None = None) -> Dataset:
        """The C-FIND of every instance (`IMAGE` with no `uids`), the C-GET or C-MOVE of
        the study or series (`RETRIEVE`), or of a list of instances of one series."""
        _, _, _, study, series = self._target(ref)
        query = Dataset()
        query.StudyInstanceUID = study
        if level == "IMAGE":
            query.QueryRetrieveLevel = "IMAGE"
            if uids is None:  # a listing: these come back for each instance
                query.SeriesInstanceUID = series or ""
                query.SOPInstanceUID = ""
                query.SOPClassUID = ""
                query.AvailableTransferSyntaxUID = ""
            else:
                query.SeriesInstanceUID = series
                query.SOPInstanceUID = uids
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

    async def _instances(self, ref: SourceRef) -> list[Instance]:
        await self._reachable(ref)
        instances = await asyncio.to_thread(self._find, ref)
        if not instances:
            raise SourceRefused(f"{self.canonical(ref)}: no such study in the PACS")
        return instances

    async def version(self, ref: SourceRef) -> str | None:
        uids = sorted(item.uid for item in await self._instances(ref))
        return f"{len(uids)}:{hashlib.sha256(chr(0).join(uids).encode()).hexdigest()[:16]}"

    def _find(self, ref: SourceRef) -> list[Instance]:
        ae = self._new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, ref)
        found: dict[str, Instance] = {}
        try:
            for status, answer in assoc.send_c_find(
                self._identifier(ref, "IMAGE"), StudyRootQueryRetrieveInformationModelFind
            ):
                self._check(status, ref, "C-FIND", assoc)
                if answer is not None and status.Status in PENDING:
                    uid = str(answer.SOPInstanceUID)
                    syntaxes = answer.get("AvailableTransferSyntaxUID") or []
                    if isinstance(syntaxes, str):
                        syntaxes = [syntaxes]
                    found[uid] = Instance(
                        uid,
                        str(answer.get("SeriesInstanceUID", "")),
                        str(answer.get("SOPClassUID", "")),
                        tuple(str(s) for s in syntaxes if s),
                    )
        finally:
            assoc.release()
        unknown = [item.uid for item in found.values() if not item.sop_class]
        if unknown:
            raise SourceRefused(
                f"{self.canonical(ref)}: the PACS's C-FIND gives no SOP Class UID for "
                f"{len(unknown)} instances; without it no storage context can be offered"
            )
        return list(found.values())

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
        if code not in (SUCCESS, *PENDING, 0xFE00) and not 0xB000 <= code <= 0xBFFF:
            comment = status.get("ErrorComment")  # the PACS's own words, when it gives them
            said = f": {comment}" if comment else ""
            raise SourceRefused(
                f"{self.canonical(ref)}: {operation} failed with 0x{code:04X}{said}"
            )

    async def fetch(self, ref: SourceRef, sink: FileSink) -> None:
        instances = await self._instances(ref)
        loop = asyncio.get_running_loop()

        def store(path: str, data: bytes) -> None:
            asyncio.run_coroutine_threadsafe(sink.put(path, _once(data)), loop).result()

        move = self.config is not None and self.config.retrieve == "move"
        if move and ref.transfer_syntax is None:
            outcome = await asyncio.to_thread(self._move, ref, instances, store)
        else:  # a conversion is asked for by the contexts we propose: C-GET
            outcome = await asyncio.to_thread(self._get, ref, instances, store)
        self._whole(ref, instances, outcome)

    def _whole(self, ref: SourceRef, instances: list[Instance], outcome: Outcome) -> None:
        """Every instance listed was stored, or the error that says what was not."""
        missing = {item.uid for item in instances} - outcome.received
        if not missing:
            return
        name, count = self.canonical(ref), len(instances)
        got = f"{count - len(missing)} of {count} instances"
        if outcome.failed:
            # The PACS tried and could not: most often an instance in a syntax it may not
            # send as proposed (no context for it, or a conversion it cannot make).
            asked = f" in {ref.transfer_syntax}" if ref.transfer_syntax else ""
            example = f", e.g. {outcome.failed_uids[0]}" if outcome.failed_uids else ""
            raise SourceRefused(
                f"{name}: the PACS sent {got}; it reports {outcome.failed} failed "
                f"sub-operations{example} (it could not send them{asked})"
            )
        raise SourceUnavailable(f"{name}: the PACS sent {got} and reported no failure")

    def _requests(self, ref: SourceRef, instances: list[Instance]) -> list[Request]:
        """The retrievals to make, each within 127 (SOP class, syntax) contexts: the study
        (or series) in one, or per batch of SOP classes, lists of instances by series."""
        batches = plan_batches(instances, ref.transfer_syntax)
        if len(batches) == 1:
            return [Request(batches[0], [self._identifier(ref, "RETRIEVE")])]
        return [
            Request(batch, [
                self._identifier(ref_of_series(ref, series), "IMAGE", uids)
                for series, uids in _by_series(batch.instances).items()
            ])
            for batch in batches
        ]  # fmt: skip

    def _get(self, ref: SourceRef, instances: list[Instance], store: StoreFn) -> Outcome:
        outcome = Outcome(received=set())
        for request in self._requests(ref, instances):
            self._get_batch(ref, request.batch, request.identifiers, store, outcome)
        return outcome

    def _get_batch(
        self,
        ref: SourceRef,
        batch: Batch,
        identifiers: list[Dataset],
        store: StoreFn,
        outcome: Outcome,
    ) -> None:
        ae = self._new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for sop_class, syntax in batch.contexts:
            ae.add_requested_context(sop_class, [syntax])
        roles = [build_role(c, scp_role=True) for c in dict.fromkeys(c for c, _ in batch.contexts)]
        expected = Expected({item.uid for item in batch.instances}, store)
        handlers = [(evt.EVT_C_STORE, expected.take)]
        assoc = self._associate(ae, ref, ext_neg=roles, evt_handlers=handlers)
        try:
            for identifier in identifiers:
                responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
                self._retrieve(assoc, ref, "C-GET", outcome, expected, responses)
        finally:
            assoc.release()
        outcome.received |= expected.received

    def _move(self, ref: SourceRef, instances: list[Instance], store: StoreFn) -> Outcome:
        if self.receiver is None:
            raise SourceRefused(
                f"{self.canonical(ref)}: retrieve is `move`, but this datacache runs no "
                "storage SCP (set MEDHIVE_DATACACHE_DIMSE_LISTEN)"
            )
        ae = self._new_ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        outcome = Outcome(received=set())
        with self.receiver.expect({item.uid for item in instances}, store) as expected:
            assoc = self._associate(ae, ref)
            try:
                # One request: the PACS proposes the contexts of what it sends, over as
                # many associations as its study needs.
                responses = assoc.send_c_move(
                    self._identifier(ref, "RETRIEVE"),
                    self.calling_aet,
                    StudyRootQueryRetrieveInformationModelMove,
                )
                self._retrieve(assoc, ref, "C-MOVE", outcome, expected, responses)
            finally:
                assoc.release()
            outcome.received = set(expected.received)
        return outcome

    def _retrieve(
        self,
        assoc: Any,
        ref: SourceRef,
        operation: str,
        outcome: Outcome,
        expected: Expected,
        responses: Iterator[tuple[Dataset, Dataset | None]],
    ) -> None:
        """One C-GET or C-MOVE request to its final answer; counts what failed, and
        raises what storing an instance raised (after the PACS was told to stop)."""
        for status, identifier in responses:
            if expected.failure is not None:
                raise expected.failure
            self._check(status, ref, operation, assoc)
            if int(status.Status) not in PENDING:  # the final answer
                outcome.failed += int(status.get("NumberOfFailedSuboperations", 0) or 0)
                uids = identifier.get("FailedSOPInstanceUIDList") if identifier else None
                if uids:
                    listed = [uids] if isinstance(uids, str) else list(uids)
                    outcome.failed_uids += tuple(str(u) for u in listed)
        if expected.failure is not None:
            raise expected.failure

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


def ref_of_series(ref: SourceRef, series: str) -> SourceRef:
    """The same study, narrowed to one series (an IMAGE-level request needs it)."""
    base, _, rest = ref.uri.partition("/studies/")
    study = rest.split("/", 1)[0]
    return SourceRef(f"{base}/studies/{study}/series/{series}", ref.transfer_syntax)


def _by_series(instances: list[Instance]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for item in instances:
        grouped.setdefault(item.series, []).append(item.uid)
    return grouped
