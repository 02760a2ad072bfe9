"""What the audit exports at `/metrics` besides the recorder's own counts (records
stored, ingest lag): the chain's head and the recorder's backlog, read when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.audit.recorder import Recorder
from shared.metrics import StateCollector


class RecorderCollector(StateCollector):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "medhive_audit_head_seq",
            "Sequence number of the newest record in the chain (the records it holds).",
            value=self.recorder.notifier.head,
        )
        yield GaugeMetricFamily(
            "medhive_audit_backlog_messages",
            "Deliveries the recorder received and has not yet taken into a batch to store.",
            value=self.recorder.backlog(),
        )
