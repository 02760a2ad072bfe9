"""The second line of defence: deadlines the node missed, and nodes that went silent.

The node agent stops a job at its walltime itself. This loop catches what a node
could not do: past the deadline plus a grace period it asks the node again; past
another grace period it ends the job as `timed_out` here. A node that sends no
heartbeat for `node_timeout_s` while the scheduler can hear it (its link to the broker
up: `Bus.hearing_since`) is offline, and its placed jobs are `lost` (then queued again
while they have retries left). The placed jobs and their clocks come from
placement's view in memory; only a job that needs acting on is read.
"""

from __future__ import annotations

from datetime import timedelta

import structlog

from services.scheduler.jobs import JobService
from services.scheduler.nodes import NodeStore
from services.scheduler.placement import PlacementView
from services.scheduler.store import JobStore
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.nodes import NodeStatus
from shared.tasks import PeriodicLoop

log = structlog.get_logger("medhive.scheduler.watchdog")


class Watchdog(PeriodicLoop):
    task_name = "watchdog"
    first_at_once = True

    def __init__(
        self,
        store: JobStore,
        nodes: NodeStore,
        jobs: JobService,
        view: PlacementView,
        bus: Bus,
        interval_s: float,
        grace_s: float,
        node_timeout_s: float,
    ) -> None:
        super().__init__(interval_s)
        self.store = store
        self.nodes = nodes
        self.jobs = jobs
        self.view = view
        self.bus = bus
        self.grace = timedelta(seconds=grace_s)
        self.node_timeout = timedelta(seconds=node_timeout_s)

    async def tick(self) -> None:
        await self.check_once()

    async def check_once(self) -> None:
        now = utcnow()
        stale = now - self.node_timeout
        # A node's silence counts only while this scheduler could hear it: heartbeats
        # sent while the broker (or the link to it) was away never arrived, and after a
        # broker restart every node would otherwise be lost with its jobs.
        hearing = self.bus.hearing_since
        judged = hearing is not None and hearing < stale
        nodes = {node["_id"]: node for node in await self.nodes.all_nodes()}
        for node_id, node in nodes.items():
            stopped_answering = judged and node["online"] and node["last_seen"] < stale
            if stopped_answering and await self.nodes.mark_offline(node_id, stale):
                log.warning("node_offline", node_id=node_id)
                status = NodeStatus.model_validate(
                    {k: v for k, v in node.items() if k in NodeStatus.model_fields}
                )
                await self.bus.emit("node.offline", status)
        silent = int(self.node_timeout.total_seconds())
        for placed in list(self.view.holding.values()):
            host = nodes.get(placed.node_id)
            lost = judged and (host is None or host["last_seen"] < stale)
            deadline, enforced = placed.deadline, placed.walltime_enforced_at
            overdue = enforced is None and deadline is not None and now > deadline + self.grace
            unconfirmed = enforced is not None and now > enforced + self.grace
            if not (lost or overdue or unconfirmed):
                continue
            job = await self.store.current(placed.job_id)
            if job is None or job.get("node_id") != placed.node_id:
                continue  # moved on meanwhile
            if lost:
                reason = f"node {placed.node_id} sent no heartbeat for {silent} s"
                await self.jobs.lose(job, reason)
            elif overdue:
                log.warning("walltime_enforced", job_id=placed.job_id, node_id=placed.node_id)
                await self.jobs.enforce_walltime(job)
            else:
                await self.jobs.time_out(job)
