"""medhive's storage SCP: where a PACS sends the instances a C-MOVE asked it for.

A C-MOVE tells the PACS to open an association of its own to a destination AE (ours)
and C-STORE each instance there. The PACS proposes the contexts, in the syntaxes it
holds, and this SCP accepts every transfer syntax for every storage SOP class, so no
instance is converted on the way. It stores only what a retrieval under way expects
(by SOP Instance UID, learnt from the C-FIND before the C-MOVE); anything else is
refused, so the port is no way to put data into the cache.

pynetdicom serves in its own threads; a retrieval registers the instances it expects
with a function that stores one (which blocks until the cache has it: the PACS is
slowed to the cache's pace) and waits for the C-MOVE's final answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class

from services.datacache.sources.errors import SourceUnavailable

log = structlog.get_logger("medhive.datacache.storescp")

#: Every storage SOP class pynetdicom knows: its current ones, and the retired ones
#: (old archives still hold them) that only its default list names.
STORAGE_CLASSES = tuple(
    dict.fromkeys(
        str(context.abstract_syntax)
        for context in (*AllStoragePresentationContexts, *StoragePresentationContexts)
    )
)
#: Store one instance: (path under the input, the DICOM file's bytes).
StoreFn = Callable[[str, bytes], None]
#: C-STORE statuses (PS3.4 B.2.3, PS3.7 C.5.x).
SUCCESS, REFUSED_NOT_AUTHORIZED, OUT_OF_RESOURCES = 0x0000, 0x0124, 0xA700
CANNOT_UNDERSTAND = 0xC000


class Expected:
    """The instances one retrieval waits for, and what has come of them; `take` is the
    C-STORE handler, on a C-GET's own association as on this SCP's."""

    def __init__(self, uids: set[str], store: StoreFn) -> None:
        self.uids = uids
        self.store = store
        self.received: set[str] = set()
        self.failure: BaseException | None = None

    def take(self, event: Any) -> int:
        """Store one C-STORE's instance if it is expected; the status to answer."""
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid not in self.uids:
            return REFUSED_NOT_AUTHORIZED
        if uid in self.received:
            return SUCCESS  # sent twice: kept once
        try:
            data = event.encoded_dataset(include_meta=True)
            series = str(event.dataset.SeriesInstanceUID)
        except Exception as exc:  # the sender's fault: this instance is missing, and said so
            log.warning("storescp_undecodable", sop_instance_uid=uid, error=repr(exc)[:200])
            return CANNOT_UNDERSTAND
        try:
            self.store(f"{series}/{uid}.dcm", data)
            self.received.add(uid)
            return SUCCESS
        except BaseException as exc:  # ours: reported by the retrieval, not lost in a thread
            self.failure = exc
            return OUT_OF_RESOURCES  # the PACS stops sending


class StorageReceiver:
    """A storage SCP on host:port that serves every retrieval of this datacache."""

    def __init__(self, host: str, port: int, ae_title: str = "MEDHIVE") -> None:
        self.host, self.port, self.ae_title = host, port, ae_title
        self._expected: dict[str, Expected] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        _serve_retired_classes_as_storage()
        ae = AE(ae_title=self.ae_title)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = self._server.server_address[1]  # the one bound, when 0 was asked
        log.info("storescp_listening", host=self.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @contextmanager
    def expect(self, uids: set[str], store: StoreFn) -> Iterator[Expected]:
        """Accept these instances while the block runs, handing each to `store`."""
        expected = Expected(uids, store)
        with self._lock:
            taken = uids & self._expected.keys()
            if taken:  # another retrieval of the same instances is under way
                raise SourceUnavailable(
                    f"{len(taken)} of its instances are being retrieved already"
                )
            self._expected.update(dict.fromkeys(uids, expected))
        try:
            yield expected
        finally:
            with self._lock:
                for uid in uids:
                    self._expected.pop(uid, None)

    def _on_store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            expected = self._expected.get(uid)
        if expected is None:
            log.warning("storescp_refused_unexpected", sop_instance_uid=uid,
                        calling_aet=event.assoc.requestor.ae_title)  # fmt: skip
            return REFUSED_NOT_AUTHORIZED
        return expected.take(event)


def _serve_retired_classes_as_storage() -> None:
    """pynetdicom accepts a context for a retired storage class, then aborts the
    association on its first C-STORE (no service class for it) unless told that the
    class is one of storage."""
    for uid in STORAGE_CLASSES:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, f"RetiredStorage{uid.replace('.', '_')}", StorageServiceClass)
