"""What the datacache exports at `/metrics` besides staging's own counts (bytes fetched,
hits and misses, staging time): bytes served, and the cache's size against its budget.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.datacache.eviction import MIB, Evictor
from shared.metrics import StateCollector, with_series


def served_bytes() -> Counter:
    """Counted by the API as it sends (added to the app's `/metrics` by the app)."""
    served = Counter(
        "medhive_datacache_served_bytes",
        "Bytes the datacache sent: to nodes (inputs, as stored or decrypted) or to "
        "tenants (results), a transfer cut short included as far as it went.",
        ["to"],
        registry=None,
    )
    return with_series(served, "node", "tenant")


SERVED_BYTES = web.AppKey("served_bytes", Counter)


class CacheCollector(StateCollector):
    """The cache's size, as the last eviction round found it, and its budget."""

    def __init__(self, evictor: Evictor) -> None:
        self.evictor = evictor

    def collect(self) -> Iterator[Metric]:
        if self.evictor.stored_bytes is not None:
            yield GaugeMetricFamily(
                "medhive_datacache_cache_bytes",
                "Bytes the cache's files take, as of the last eviction round.",
                value=self.evictor.stored_bytes,
            )
        yield GaugeMetricFamily(
            "medhive_datacache_cache_budget_bytes",
            "Bytes the cache may take before eviction frees room (least recently used first).",
            value=self.evictor.settings.budget_mb * MIB,
        )
