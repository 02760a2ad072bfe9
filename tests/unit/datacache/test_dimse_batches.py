"""How a DIMSE retrieval spreads its storage contexts over associations; where the storage
SCP for C-MOVE runs; which inputs may ask for a conversion."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError
from pynetdicom import ALL_TRANSFER_SYNTAXES

from services.datacache.app import storage_receiver
from services.datacache.settings import DatacacheSettings
from services.datacache.sources.base import (
    SourceConfig,
    SourceRef,
    SourceRefused,
    SourceUnavailable,
)
from services.datacache.sources.dimse import (
    MAX_STORAGE_CONTEXTS,
    DimseSource,
    Instance,
    Outcome,
    plan_batches,
)
from shared.messages.data import InputSpec

CT, MR, SC = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT, RLE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"


def _instances(*classes: str, syntaxes: tuple[str, ...] = ()) -> list[Instance]:
    return [Instance(f"1.2.{n}", "1.3", sop_class, syntaxes) for n, sop_class in enumerate(classes)]


def test_every_syntax_for_each_class_when_the_pacs_does_not_say() -> None:
    batches = plan_batches(_instances(CT, MR, SC, CT), None)
    assert all(len(batch.contexts) <= MAX_STORAGE_CONTEXTS for batch in batches)
    offered = [pair for batch in batches for pair in batch.contexts]
    assert set(offered) == {(c, s) for c in (CT, MR, SC) for s in ALL_TRANSFER_SYNTAXES}
    assert len(offered) == len(set(offered))  # each pair in one association only
    for batch in batches:  # an instance goes where its class's contexts are
        classes = {sop_class for sop_class, _ in batch.contexts}
        assert {item.sop_class for item in batch.instances} <= classes
    assert sum(len(batch.instances) for batch in batches) == 4


def test_only_the_syntaxes_the_pacs_lists_or_the_one_asked_for() -> None:
    listed = plan_batches(_instances(CT, MR, syntaxes=(RLE, EXPLICIT)), None)
    assert [batch.contexts for batch in listed] == [
        [(CT, RLE), (CT, EXPLICIT), (MR, RLE), (MR, EXPLICIT)]
    ]
    converted = plan_batches(_instances(CT, MR, SC), EXPLICIT)
    assert [batch.contexts for batch in converted] == [
        [(CT, EXPLICIT), (MR, EXPLICIT), (SC, EXPLICIT)]
    ]


def test_the_storage_scp_runs_only_when_configured() -> None:
    assert storage_receiver(DatacacheSettings()) is None
    receiver = storage_receiver(DatacacheSettings(dimse_listen="127.0.0.1:0"))
    assert receiver is not None and receiver.port > 0
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=5):
            pass  # it listens
    finally:
        receiver.stop()


def test_a_transfer_syntax_is_asked_of_dicom_sources_only() -> None:
    dicom = {"name": "ct", "source": "dimse://PACS@pacs:104/studies/1.2.3", "path": "/data/ct"}
    assert (
        InputSpec.model_validate({**dicom, "transfer_syntax": EXPLICIT}).transfer_syntax == EXPLICIT
    )
    for wrong in (
        {**dicom, "transfer_syntax": "JPEG"},  # not a UID
        {**dicom, "source": "https://data.example/ct.zip", "transfer_syntax": EXPLICIT},
    ):
        with pytest.raises(ValidationError):
            InputSpec.model_validate(wrong)


def test_a_study_is_staged_only_whole() -> None:
    """Fewer instances than the C-FIND listed: the PACS's failed sub-operations make it a
    refusal naming them (it would fail the same way again); with no failure reported, the
    association ended early, which may pass."""
    source = DimseSource(SourceConfig(tenant="t", match="dimse://PACS@pacs:104"), None)  # type: ignore[arg-type]
    ref = SourceRef("dimse://PACS@pacs:104/studies/1.2.3")
    listed = _instances(CT, CT, CT)
    source._whole(ref, listed, Outcome(received={item.uid for item in listed}))
    with pytest.raises(
        SourceRefused,
        match=r"sent 1 of 3 instances; it reports 2 failed sub-operations, e.g. 1\.2\.1",
    ):
        source._whole(ref, listed, Outcome(received={"1.2.0"}, failed=2, failed_uids=("1.2.1",)))
    with pytest.raises(SourceUnavailable, match="sent 2 of 3 instances and reported no failure"):
        source._whole(ref, listed, Outcome(received={"1.2.0", "1.2.1"}))
