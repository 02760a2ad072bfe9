"""The node agent: runs what the scheduler places on this node and reports how it went.

Message flow for one attempt:

1. `node.run` arrives on the node's queue. The handler creates and starts the
   workload (or finds the one a redelivered command already created), publishes
   `run.started`, starts a watcher and returns, so the delivery is acked at once:
   a job may run far longer than the broker lets a delivery stay unacked.
2. The watcher waits for the workload to exit, for its deadline, or for a
   `node.cancel`; at the deadline or on cancel it stops the workload (SIGTERM,
   then SIGKILL after the grace period).
3. It publishes `run.output` (stdout, stderr; the last bytes, bounded), then
   `run.finished` with the outcome, and only then removes the workload: a crash in
   between repeats a report, which the scheduler ignores, and never loses one.

The agent keeps no store: the workloads' labels in the engine are its record. On
start it adopts whatever this node's previous agent left: running workloads get a
watcher again, exited ones are reported and removed.

One module because adopting, `on_run`, `on_cancel` and the watchers all work on the
agent's two tables of attempts, `_watches` and `_finished`: whether a command starts a
workload, repeats an announcement or does nothing is read from them, and a watcher
updates them when it reports.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Literal

import aiohttp
import structlog

from services.vmnode.jobdata import DataUnavailable, JobData
from services.vmnode.runtimes.base import (
    EngineUnavailable,
    ExitInfo,
    ImageMissing,
    Output,
    Runtime,
    Workload,
    WorkloadGone,
    WorkloadRefused,
    keep_tail,
)
from services.vmnode.settings import NodeSettings
from services.vmnode.watch import Watch, run_finished
from shared.backoff import Backoff
from shared.bus import Bus
from shared.consume import Incoming, Rejected, Retry
from shared.envelope import derived_id, utcnow
from shared.identity import Sender
from shared.messages.jobs import NodeCancel, NodeRun, Resources, run_command_id
from shared.messages.nodes import RunFinished, RunInteractive, RunOutcome, RunOutput, RunStarted

log = structlog.get_logger("medhive.vmnode")

#: Finished attempts remembered, so a late redelivered `node.run` starts nothing.
FINISHED_MEMORY = 10_000
#: How long a `node.cancel` waits for the run's report beyond the stop grace period.
CANCEL_REPORT_S = 30.0


class Agent:
    """Consumes this node's commands, watches its workloads, reports their ends."""

    def __init__(
        self, bus: Bus, runtime: Runtime, settings: NodeSettings, data: JobData | None = None
    ) -> None:
        self.bus = bus
        self.runtime = runtime
        self.settings = settings
        self.data = data or JobData(settings)
        self._watches: dict[tuple[str, int], Watch] = {}
        self._finished: OrderedDict[tuple[str, int], RunOutcome] = OrderedDict()

    def running(self) -> list[str]:
        """Job ids of the attempts running here (for heartbeats)."""
        return sorted({job_id for job_id, _ in self._watches})

    def watches(self) -> list[Watch]:
        """The attempts watched here, until each is reported (for `/metrics`)."""
        return list(self._watches.values())

    # -- lifecycle ------------------------------------------------------------------

    async def adopt(self) -> None:
        """Take over the workloads a previous agent on this node left behind.

        Each attempt is announced as started before it is reported as finished, even
        one that ended while no agent watched: the announcement has the id and the
        start time of the first one, so where that one went out, this is a repeat
        that every consumer recognises.
        """
        for workload in await self.runtime.list_own():
            if workload.key in self._watches:
                continue
            log.info("run_adopted", job_id=workload.job_id, state=workload.state)
            if workload.state == "created" and workload.deadline > utcnow():
                # The agent stopped between create and start, before acking the run.
                try:
                    await self.runtime.start(workload)
                except WorkloadRefused as exc:
                    self._watch(workload).decide("failed", str(exc))
                    continue
                await self._announce(self._watch(workload))
            elif workload.state == "exited":
                await self._announce(self._watch(workload))
            else:
                # Running: announced unless the agent died before it could; a run.started
                # that never went out leaves its node.run unacked, and its redelivery
                # announces it then (`on_run`).
                self._watch(workload)
        await self.data.wipe_orphans(set(self._watches))

    async def detach(self) -> None:
        """Stop watching; the workloads keep running for the next agent to adopt."""
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()

    # -- commands -------------------------------------------------------------------

    async def authorize(self, user_id: str | None) -> Sender:
        """Only the scheduler's account may send node commands."""
        if user_id not in self.settings.amqp.service_users(self.settings.trusted_users):
            raise Rejected(f"node commands are accepted from the scheduler only, not {user_id!r}")
        return Sender(user_id, service=True)

    async def on_run(self, incoming: Incoming[NodeRun]) -> None:
        run = incoming.payload
        key = (run.job_id, run.attempt)
        if key in self._finished:
            log.info("run_already_finished", attempt=run.attempt, outcome=self._finished[key])
            return
        if (watch := self._watches.get(key)) is not None:  # redelivered: no second workload
            if not watch.announced:
                await self._announce(watch)
            return
        if run.deadline <= utcnow():
            why = f"the deadline {run.deadline.isoformat()} passed before the run could start"
            await self._report_unstarted(run, "timed_out", why)
            return
        try:
            mounts = [] if self.runtime.brings_data(run) else await self.data.prepare(run)
        except (DataUnavailable, aiohttp.ClientError, OSError) as exc:
            await self.data.wipe(run.job_id, run.attempt)
            why = f"the job's data could not be placed on node {self.settings.node_id}: {exc}"
            await self._report_unstarted(run, "failed", why)
            return
        try:
            workload = await self.runtime.prepare(run, mounts)
        except (ImageMissing, WorkloadRefused) as exc:
            await self.data.wipe(run.job_id, run.attempt)
            await self._report_unstarted(run, "failed", str(exc))
            return
        except EngineUnavailable as exc:
            raise Retry(str(exc)) from exc
        if workload.state == "created":
            try:
                await self.runtime.start(workload)
            except WorkloadRefused as exc:
                await self._report_unstarted(run, "failed", str(exc))
                await self.runtime.remove(workload)
                await self.data.wipe(run.job_id, run.attempt)
                return
            except EngineUnavailable as exc:
                raise Retry(str(exc)) from exc
        log.info("run_started", attempt=run.attempt, workload_id=workload.id, state=workload.state)
        # Watched even when the announcement fails (the redelivery announces it then).
        await self._announce(self._watch(workload, run.spec.resources))

    async def on_cancel(self, incoming: Incoming[NodeCancel]) -> None:
        cancel = incoming.payload
        watch = self._watches.get((cancel.job_id, cancel.attempt))
        if watch is None or watch.task is None:
            log.info("cancel_ignored", attempt=cancel.attempt, why="no such run on this node")
            return
        watch.decide("cancelled", cancel.reason, str(incoming.envelope.id))
        # Ack only once the run is stopped and reported.
        await asyncio.wait({watch.task}, timeout=self._grace(watch.workload) + CANCEL_REPORT_S)

    # -- watching -------------------------------------------------------------------

    def _watch(self, workload: Workload, need: Resources | None = None) -> Watch:
        if (watch := self._watches.get(workload.key)) is None:
            watch = Watch(workload, need)
            # A fresh context: the watcher outlives the message that started it, so it
            # must not log under that message's id.
            watch.task = asyncio.create_task(
                self._follow(watch), name=f"watch-{workload.id}", context=contextvars.Context()
            )
            self._watches[workload.key] = watch
        return watch

    async def _expose(self, watch: Watch) -> None:
        """Once the guest answers on its interactive ports, say where users connect."""
        workload = watch.workload
        try:
            endpoints = await self.runtime.expose(workload)
        except Exception as exc:
            # The job runs on without its ports; the log and the job's history say why.
            log.warning("expose_failed", reason=str(exc))
            return
        if endpoints and not watch.stop_requested.is_set():
            ready = RunInteractive(
                job_id=workload.job_id,
                attempt=workload.attempt,
                node_id=self.settings.node_id,
                endpoints=endpoints,
            )
            await self.bus.emit(
                "run.interactive", ready, **self._fields(workload, "run.interactive")
            )
            log.info("run_interactive", endpoints=endpoints)

    def _grace(self, workload: Workload) -> float:
        """How long a workload gets to stop by itself: a guest OS needs longer."""
        if workload.kind == "vm":
            return self.settings.vm_shutdown_grace_s
        return self.settings.stop_grace_s

    async def _follow(self, watch: Watch) -> None:
        """Watch until reported; an engine or broker outage is retried, not fatal."""
        workload = watch.workload
        started = time.monotonic()
        backoff = Backoff(0.5, 30.0)
        with structlog.contextvars.bound_contextvars(
            job_id=workload.job_id, attempt=workload.attempt, tenant=workload.tenant
        ):
            exposing = asyncio.create_task(self._expose(watch), name=f"expose-{workload.id}")
            while True:
                try:
                    outcome = await self._end(watch)
                    break
                except Exception:
                    # A watcher is a background task: nothing above it would retry or
                    # report, so it must outlive an engine restart or a broker outage.
                    delay = backoff.next()
                    log.exception("watch_failed", retry_in_s=delay)
                    await asyncio.sleep(delay)
            exposing.cancel()
            await asyncio.gather(exposing, return_exceptions=True)
            del self._watches[workload.key]
            log.info(
                "run_finished",
                outcome=outcome,
                watched_s=round(time.monotonic() - started, 3),
            )

    async def _end(self, watch: Watch) -> RunOutcome:
        """Wait for the end, stop if needed, report, remove; safe to run again."""
        workload = watch.workload
        try:
            info: ExitInfo | None = await self._exit(watch)
            output = await self.runtime.output(workload, self.settings.log_limit_bytes)
        except WorkloadGone:
            info, output = None, Output("", "")
        finished = run_finished(watch, info, self.settings.node_id)
        if not watch.reported:
            finished = await self._keep_outputs(workload, finished)
            await self._report(watch, output, finished, info)
            watch.reported = True
            self._remember(workload.key, finished.outcome)  # from now on, redeliveries are moot
        await self.runtime.remove(workload)
        await self.data.wipe(workload.job_id, workload.attempt)
        return finished.outcome

    async def _keep_outputs(self, workload: Workload, finished: RunFinished) -> RunFinished:
        """Store /outputs before reporting; a job whose results were lost did not succeed."""
        try:
            files = await self.runtime.stored_outputs(workload)
            if files is None:  # on this host: the agent stores them
                export = functools.partial(self.runtime.export_outputs, workload)
                files = await self.data.collect(workload.job_id, workload.attempt, export)
        except (DataUnavailable, WorkloadRefused, OSError) as exc:
            log.warning("outputs_not_stored", reason=str(exc))
            if finished.outcome != "succeeded":
                return finished
            return finished.model_copy(
                update={"outcome": "failed", "reason": f"results could not be stored: {exc}"}
            )
        if files:
            log.info("outputs_stored", files=len(files), bytes=sum(f.size for f in files))
        return finished.model_copy(update={"outputs": files})

    async def _exit(self, watch: Watch) -> ExitInfo:
        """How the workload ended, stopping it at its deadline or when asked to."""
        workload = watch.workload
        info = await self._until_end(watch)
        if info is None:  # deadline or cancel
            if watch.outcome is None:
                ended = workload.deadline.isoformat()
                watch.decide("timed_out", f"walltime ended at {ended}")
            await self.runtime.stop(workload, self._grace(workload))
            info = await self.runtime.wait(workload)
        return info

    async def _report(
        self, watch: Watch, output: Output, finished: RunFinished, info: ExitInfo | None
    ) -> None:
        """`run.output` per non-empty stream, then `run.finished`; each with the id and
        the time of the end that a repeat (an agent that restarted) has too."""
        workload = watch.workload
        ended = info.finished_at if info is not None and info.finished_at else None
        streams: list[tuple[Literal["stdout", "stderr"], str, bool]] = [
            ("stdout", output.stdout, output.stdout_truncated),
            ("stderr", output.stderr, output.stderr_truncated),
        ]
        for stream, data, cut in streams:
            if data:
                payload = RunOutput(
                    job_id=workload.job_id,
                    attempt=workload.attempt,
                    node_id=self.settings.node_id,
                    stream=stream,
                    data=data,
                    truncated=cut,
                )
                # Control characters grow sixfold in JSON: keep the message under the
                # consumers' limit by keeping less of the tail.
                room = self.bus.settings.max_message_bytes // 2
                while len(payload.model_dump_json()) > room:
                    data = keep_tail(payload.data, len(payload.data.encode()) // 2)[0]
                    payload = payload.model_copy(update={"data": data, "truncated": True})
                fields = self._fields(workload, "run.output", stream, at=ended)
                await self.bus.emit("run.output", payload, **fields)
        fields = self._fields(workload, "run.finished", at=ended)
        if watch.stopped_by is not None:  # a cancel ended it: that is its cause
            fields["causation_id"] = watch.stopped_by
        await self.bus.emit("run.finished", finished, **fields)

    async def _until_end(self, watch: Watch) -> ExitInfo | None:
        """The exit, or None when the deadline passed or a stop was asked for first."""
        if watch.stop_requested.is_set():
            return None
        remaining = (watch.workload.deadline - utcnow()).total_seconds()
        exited = asyncio.ensure_future(self.runtime.wait(watch.workload))
        stop = asyncio.ensure_future(watch.stop_requested.wait())
        try:
            await asyncio.wait(
                {exited, stop}, timeout=max(remaining, 0.0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (stop, exited):
                task.cancel()  # no-op for the one that finished
            await asyncio.gather(stop, exited, return_exceptions=True)
        if exited.done() and not exited.cancelled():
            return exited.result()  # raises what the engine raised: retried by _follow
        return None

    # -- reports --------------------------------------------------------------------

    def _fields(
        self, workload: Workload, event: str, *parts: str, at: datetime | None = None
    ) -> dict[str, Any]:
        """Envelope fields of a report about `workload`: an id derived from what it
        reports, the attempt's `node.run` as its cause, and `at` as its time when the
        engine knows it. Every announcement of one fact is then the same message."""
        fields: dict[str, Any] = {
            "id": derived_id(event, workload.job_id, workload.attempt, *parts),
            "correlation_id": workload.job_id,
            "causation_id": str(run_command_id(workload.job_id, workload.attempt)),
            "tenant": workload.tenant,
        }
        if at is not None:
            fields["occurred_at"] = at
        return fields

    async def _announce(self, watch: Watch) -> None:
        """`run.started`, with the start time the engine recorded."""
        workload = watch.workload
        try:
            started_at = await self.runtime.started_at(workload)
        except WorkloadGone:
            started_at = None
        started = RunStarted(
            job_id=workload.job_id,
            attempt=workload.attempt,
            node_id=self.settings.node_id,
            workload_id=workload.id,
            started_at=started_at,
        )
        fields = self._fields(workload, "run.started", at=started_at)
        await self.bus.emit("run.started", started, **fields)
        watch.announced = True

    async def _report_unstarted(self, run: NodeRun, outcome: RunOutcome, reason: str) -> None:
        log.info("run_not_started", attempt=run.attempt, outcome=outcome, reason=reason)
        finished = RunFinished(
            job_id=run.job_id,
            attempt=run.attempt,
            node_id=self.settings.node_id,
            outcome=outcome,
            reason=reason,
        )
        await self.bus.emit(
            "run.finished",
            finished,
            id=derived_id("run.finished", run.job_id, run.attempt),
            correlation_id=run.job_id,
            causation_id=str(run_command_id(run.job_id, run.attempt)),
            tenant=run.tenant,
        )
        self._remember((run.job_id, run.attempt), outcome)

    def _remember(self, key: tuple[str, int], outcome: RunOutcome) -> None:
        self._finished[key] = outcome
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
