"""What the scheduler exports at `/metrics`.

Jobs by state, the queue and the nodes' capacity come from what placement keeps in
memory anyway (`PlacementView`, the store's node view), read when Prometheus scrapes:
no query of the jobs, however many there are. What happens to jobs (how long they
waited, how they ended) is counted as the view sees their state change (`JobFlow`).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from services.scheduler.documents import JobDocument, NodeDocument
from services.scheduler.nodes import NodeStore
from services.scheduler.placement import Placer, Room, placed_since
from shared.envelope import utcnow
from shared.messages.jobs import JobState
from shared.metrics import StateCollector

MIB = 1024 * 1024


class JobFlow:
    """Counts what placement sees each job go through (a `PlacementView` move)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submit_to_dispatch = Histogram(
            "medhive_scheduler_submit_to_dispatch_seconds",
            "From a job's submission to its first dispatch to a node.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=registry,
        )
        self.dispatch_to_running = Histogram(
            "medhive_scheduler_dispatch_to_running_seconds",
            "From a job's dispatch to its node's report that it runs (data grant, image, start).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.ended = Counter(
            "medhive_scheduler_jobs_ended",
            "Jobs this scheduler saw end, by final state and tenant.",
            ["state", "tenant"],
            registry=registry,
        )

    def moved(self, job: JobDocument, before: JobState | None) -> None:
        """A job's state changed; `before` is None for a job new to the view, whose
        earlier life is unknown (and so not counted)."""
        if before is None:
            return
        state = JobState(job["state"])
        if state == JobState.dispatched and job.get("attempt") == 1 and "created_at" in job:
            self.submit_to_dispatch.observe(_seconds_since(job["created_at"]))
        elif state == JobState.running and before == JobState.dispatched:
            self.dispatch_to_running.observe(_seconds_since(placed_since(job)))
        elif state.terminal:
            self.ended.labels(state.value, job["tenant"]).inc()


def _seconds_since(moment: datetime) -> float:
    return max(0.0, (utcnow() - moment).total_seconds())


class SchedulerCollector(StateCollector):
    """Jobs, queue and node capacity, as placement sees them now."""

    def __init__(self, placer: Placer, nodes: NodeStore) -> None:
        self.placer = placer
        self.nodes = nodes
        self._nodes: list[NodeDocument] = []

    async def refresh(self) -> None:
        self._nodes = await self.nodes.all_nodes()  # in memory after the first read

    def collect(self) -> Iterator[Metric]:
        view = self.placer.view
        jobs = GaugeMetricFamily(
            "medhive_scheduler_jobs",
            "Jobs not ended, by state and tenant.",
            labels=["state", "tenant"],
        )
        for (state, tenant), count in sorted(Tally(view.states.values()).items()):
            jobs.add_metric([state.value, tenant], count)
        yield jobs
        queued = GaugeMetricFamily(
            "medhive_scheduler_queued_jobs",
            "Jobs of a tenant not placed yet (queued, or staging their inputs): what its "
            "queued quota counts.",
            labels=["tenant"],
        )
        for tenant, waiting in sorted(view.unplaced.items()):
            queued.add_metric([tenant], len(waiting))
        yield queued
        yield from self._nodes_metrics()

    def _nodes_metrics(self) -> Iterator[Metric]:
        reserved = self.placer.view.in_use()
        families = [
            GaugeMetricFamily(name, help_, labels=["node"])
            for name, help_ in (
                ("medhive_scheduler_node_online",
                 "1 while the node is online, 0 once it went offline or was lost."),
                ("medhive_scheduler_node_capacity_cpus", "CPU cores the node offers to jobs."),
                ("medhive_scheduler_node_reserved_cpus",
                 "CPU cores the jobs placed on the node hold."),
                ("medhive_scheduler_node_capacity_memory_bytes", "Memory the node offers to jobs."),
                ("medhive_scheduler_node_reserved_memory_bytes",
                 "Memory the jobs placed on the node hold."),
            )
        ]  # fmt: skip
        for node in self._nodes:
            held = reserved.get(node["_id"], Room(0.0, 0))
            values = (
                1 if node.get("online") else 0,
                float(node.get("cpus", 0)),
                held.cpus,
                int(node.get("memory_mb", 0)) * MIB,
                held.memory_mb * MIB,
            )
            for family, value in zip(families, values, strict=True):
                family.add_metric([node["_id"]], value)
        yield from families
