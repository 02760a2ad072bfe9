"""`/metrics`: what a service exports for Prometheus, in its text format.

Every app owns a registry (`METRICS`), never the library's global one: several apps
share one process in the tests, and one registry would mix their numbers. Most of what
a service exports is state it keeps anyway (queues, capacity, pools, each consumer's
tally), turned into metrics only when Prometheus scrapes, by a `StateCollector`: that
costs nothing per message. What must be counted as it happens is a plain `Counter` or
`Histogram` (an `inc`/`observe` costs about a microsecond), made by the part that counts
without a registry and added to the app's by the app.

`/metrics` is read with a token of role `metrics` (which reads nothing else) or
`operator`; it is no part of the OpenAPI documents, being Prometheus's format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.auth import Role
from shared.bus import Bus
from shared.http import roles

#: A metric counted as it happens, with one label.
Counted = TypeVar("Counted", Counter, Histogram)


def with_series(metric: Counted, *values: str) -> Counted:
    """`metric` with the series of each label value made at once: a series that exists
    from the start has a `rate()` from the start, rather than from its first event."""
    for value in values:
        metric.labels(value)
    return metric


class StateCollector(ABC):
    """Turns state a service keeps into metrics when Prometheus scrapes."""

    async def refresh(self) -> None:  # noqa: B027 - most collectors read nothing ahead
        """Fetch, before `collect`, what only an await reaches."""

    @abstractmethod
    def collect(self) -> Iterator[Metric]:
        """The metrics, from state in memory (no I/O: the exposition is synchronous)."""


class Metrics:
    """One app's registry, and the collectors to refresh before each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._state: list[StateCollector] = []

    def add(self, *collectors: Collector) -> None:
        """Export these: state collectors, counters, histograms."""
        for collector in collectors:
            self.registry.register(collector)
            if isinstance(collector, StateCollector):
                self._state.append(collector)

    async def exposition(self) -> bytes:
        for collector in self._state:
            await collector.refresh()
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


@roles(Role.metrics, Role.operator)
async def scrape(request: web.Request) -> web.Response:
    """The app's metrics, in the text format every Prometheus version reads."""
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


class ConsumerCollector(StateCollector):
    """What each consumer of the bus handled (`shared.consume`: `Consumer.tally`)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        handled = CounterMetricFamily(
            "medhive_messages_handled",
            "Deliveries the service's consumers handled, by queue, message type ('other' "
            "for a type the queue does not take) and outcome: ok (acknowledged), rejected "
            "(dead-lettered), retried (handed back to the queue).",
            labels=["queue", "type", "outcome"],
        )
        dead = CounterMetricFamily(
            "medhive_dead_letters",
            "Deliveries the service's consumers copied to the dead-letter exchange.",
            labels=["queue"],
        )
        # The bus keeps the consumers it started; it has no public view of them yet.
        for consumer in self.bus.consumers:
            for (kind, outcome), count in sorted(consumer.tally.items()):
                handled.add_metric([consumer.queue_name, kind, outcome], count)
            dead.add_metric([consumer.queue_name], consumer.dead_letters)
        yield handled
        yield dead
