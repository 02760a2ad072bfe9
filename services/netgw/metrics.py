"""What netgw exports at `/metrics`: how full its two pools are, read from the store's
memory when scraped."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.netgw.store import NetStore
from shared.metrics import StateCollector


class PoolCollector(StateCollector):
    """Leases against the address pool, forwards against the external port range."""

    def __init__(self, store: NetStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        settings = self.store.settings
        low, high = settings.external_ports
        yield GaugeMetricFamily(
            "medhive_netgw_leases_in_use",
            "Guest addresses leased (each a MAC and an IP of the pool), claims included.",
            value=len(self.store.live_leases()),
        )
        yield GaugeMetricFamily(
            "medhive_netgw_lease_pool_size",
            "Guest addresses in the pool.",
            value=settings.pool_size,
        )
        yield GaugeMetricFamily(
            "medhive_netgw_ports_in_use",
            "External ports forwarded to a guest's port.",
            value=len(self.store.live_forwards()),
        )
        yield GaugeMetricFamily(
            "medhive_netgw_port_range_size", "External ports in the range.", value=high - low + 1
        )
