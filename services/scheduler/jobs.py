"""What happens to a job: submit, cancel, dispatch, and the node's reports about it.

`JobService` is the only writer of jobs. Every change follows one path, `_write`:
take the job (the store's copy in memory, else a read), decide what to change, store it
with `JobStore.apply` (guarded by the job's revision, so a concurrent change makes it
read again and decide again instead of overwrite), then have the outbox relay publish
the announcing messages.

One module because every change of a job, whoever asks for it (the API, a node's
report, the datacache, the watchdog), is decided by `_transition` or `annotate` and
stored by `_write`, with the messages `_job_event` and `_command` build; callers kept
apart from that path could grow a second way of writing a job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import structlog

from services.scheduler.documents import (
    HistoryEntry,
    HistoryNote,
    JobCommand,
    JobDocument,
    JobHead,
    OutboxEntry,
)
from services.scheduler.ids import new_job_id
from services.scheduler.outbox import OutboxRelay
from services.scheduler.store import (
    ALLOWED,
    Change,
    JobStore,
    Submission,
    outbox_entry,
    with_fields,
)
from services.scheduler.tenants import Admission
from shared.bus import Bus
from shared.envelope import utcnow
from shared.messages.base import Payload
from shared.messages.catalog import job_event_type
from shared.messages.data import DataGrant, DataRelease, DataStage
from shared.messages.jobs import (
    JobEvent,
    JobInteractive,
    JobSpec,
    JobState,
    NodeCancel,
    NodeRun,
    run_command_id,
)
from shared.messages.nodes import RunFinished, RunInteractive, RunStarted

log = structlog.get_logger("medhive.scheduler.jobs")

#: How a node's outcome maps to the job's terminal state.
OUTCOME_STATES = {
    "succeeded": JobState.succeeded,
    "failed": JobState.failed,
    "timed_out": JobState.timed_out,
    "cancelled": JobState.cancelled,
}


#: (job id, tenant, spec) -> the node the new job goes to now, or None: it queues.
PlaceAtOnce = Callable[[str, str, JobSpec], Awaitable[str | None]]


async def _nowhere(job_id: str, tenant: str, spec: JobSpec) -> str | None:
    return None


class JobNotFound(Exception):
    """No such job for this tenant (another tenant's job is also 'not found')."""


class JobFinished(Exception):
    """The job already ended; it cannot be cancelled."""


class JobService:
    def __init__(
        self,
        store: JobStore,
        bus: Bus,
        relay: OutboxRelay,
        wake_placer: Callable[[], None],
        upload_grace_s: float = 600.0,
    ) -> None:
        self.store = store
        self.bus = bus
        self.relay = relay
        self.wake_placer = wake_placer
        #: A node for a new job that can be placed as it arrives, its room held until
        #: `let_go` (set by the app to the placer's; by default none is)
        self.place_at_once: PlaceAtOnce = _nowhere
        self.let_go: Callable[[str], None] = lambda job_id: None
        #: How long after the walltime a node may still store the job's results.
        self.upload_grace = timedelta(seconds=upload_grace_s)
        #: The queued-jobs quota (set by the app; none: no quota)
        self.admission: Admission | None = None

    # -- messages -----------------------------------------------------------------

    def _job_event(
        self,
        job: JobHead,
        state: JobState,
        previous: JobState | None,
        reason: str | None,
        causation_id: str | None,
    ) -> OutboxEntry:
        """The outbox entry of `job.<state>`; `job` already has the new fields merged."""
        event = JobEvent(
            job_id=job["_id"],
            state=state,
            previous_state=previous,
            reason=reason,
            attempt=job.get("attempt", 0),
            node_id=job.get("node_id"),
            exit_code=job.get("exit_code") if state.terminal else None,
        )
        envelope = self.bus.envelope(
            job_event_type(state),
            event,
            correlation_id=job["_id"],
            # What no message caused directly (placement, the watchdog) is still a
            # consequence of the command that made the job.
            causation_id=causation_id or (job.get("command") or {}).get("id"),
            tenant=job["tenant"],
            actor=job.get("actor"),
        )
        return outbox_entry(envelope)

    def _command(self, job: JobHead, type_: str, payload: Payload, **fields: Any) -> OutboxEntry:
        """An outbox entry for a command about `job` (to its node, for node commands)."""
        envelope = self.bus.envelope(
            type_,
            payload,
            correlation_id=job["_id"],
            tenant=job["tenant"],
            actor=job.get("actor"),
            **fields,
        )
        node_id = job["node_id"] if type_.startswith("node.") else None
        return outbox_entry(envelope, node_id=node_id)

    def _release_data(
        self, job: JobDocument, to: JobState, reason: str | None
    ) -> list[OutboxEntry]:
        """`data.release` when a job that had data ends (results go on if it succeeded)."""
        spec = JobSpec.model_validate(job["spec"])
        if not spec.needs_data:
            return []
        upload_to = spec.outputs.destination if spec.outputs and to == JobState.succeeded else None
        release = DataRelease(job_id=job["_id"], reason=reason or to.value, upload_to=upload_to)
        return [self._command(job, "data.release", release)]

    async def _write(
        self,
        job_id: str,
        decide: Callable[[JobDocument], Change | None],
        *,
        current: JobDocument | None = None,
    ) -> JobDocument | None:
        """Decide on the job and store the change; returns the job as written, or None
        when `decide` declined (or the job is not there).

        `current` is the job as the caller just read it. A copy from memory that makes
        `decide` decline is read again first: the refusal must rest on the stored job.
        """
        fresh = False
        for _ in range(5):
            job = await self.store.current(job_id, fresh=fresh, seen=current)
            current = None
            if job is None:
                return None
            change = decide(job)
            if change is None:
                if fresh:
                    return None
                fresh = True
                continue
            published = self.relay.published(job_id)
            written = await self.store.apply(job, change, published)
            fresh = True
            if written is None:
                continue  # changed meanwhile
            if "outbox" in job:
                self.relay.forget(job_id, {e["id"] for e in job["outbox"]} & published)
            state = JobState(written["state"])
            await self.relay.flush(job_id, change.outbox, final=state.terminal)
            if "state" in change.fields and (state.terminal or state == JobState.queued):
                self.wake_placer()  # room freed, or a job to place
            return written
        log.warning("write_contended", job_id=job_id)
        return None

    def _transition(
        self,
        job: JobDocument,
        to: JobState,
        reason: str | None,
        causation_id: str | None,
        set_fields: dict[str, Any] | None = None,
        commands: Callable[[JobDocument], list[OutboxEntry]] | None = None,
    ) -> Change | None:
        """The change that moves `job` to `to` with its event (and `commands`, and the
        release of its data if it ends), or None if its state may not move there."""
        previous = JobState(job["state"])
        if to not in ALLOWED[previous]:
            return None
        merged = with_fields(job, set_fields or {})
        outbox = [self._job_event(merged, to, previous, reason, causation_id)]
        if commands is not None:
            outbox.extend(commands(merged))
        if to.terminal:
            outbox.extend(self._release_data(merged, to, reason))
        fields = {"state": to.value, **(set_fields or {})}
        entry: HistoryEntry = {"state": to.value, "at": utcnow(), "reason": reason}
        for key in ("attempt", "node_id", "exit_code"):
            if key in fields:
                entry[key] = fields[key]
        return Change(fields, [entry], outbox)

    async def _move(
        self,
        job_id: str,
        to: JobState,
        reason: str | None,
        *,
        causation_id: str | None = None,
        expect: dict[str, Any] | None = None,
        set_fields: dict[str, Any] | None = None,
        commands: Callable[[JobDocument], list[OutboxEntry]] | None = None,
        current: JobDocument | None = None,
    ) -> JobDocument | None:
        """Move a job from whatever state it is in now to `to`, if that is allowed and
        the job has the `expect`ed fields."""

        def decide(job: JobDocument) -> Change | None:
            if not _has(job, expect):
                return None
            return self._transition(job, to, reason, causation_id, set_fields, commands)

        return await self._write(job_id, decide, current=current)

    async def annotate(
        self,
        job_id: str,
        fields: dict[str, Any],
        *,
        expect: dict[str, Any] | None = None,
        note: HistoryNote | None = None,
        commands: Callable[[JobDocument], list[OutboxEntry]] | None = None,
    ) -> JobDocument | None:
        """Set fields of a job without changing its state (staging progress, a grant,
        a cancel request), with the messages that go with it and optionally a note in
        its history (`event` and `reason`; state and time are added here)."""

        def decide(job: JobDocument) -> Change | None:
            if not _has(job, expect):
                return None
            history: list[HistoryEntry] = []
            if note:
                event, why = note["event"], note["reason"]
                history.append(
                    {"state": job["state"], "at": utcnow(), "event": event, "reason": why}
                )
            return Change(fields, history, commands(job) if commands else [])

        return await self._write(job_id, decide)

    # -- commands -----------------------------------------------------------------

    async def submit(
        self,
        tenant: str,
        actor: str | None,
        spec: JobSpec,
        command: JobCommand,
        redeliverable: bool = True,
    ) -> Submission:
        """Store a new job as queued, or find the one this command repeats.

        `command` is `{"id", "sender"}`: the message (or request) id and who sent it;
        it is the cause of every event of the job that no later message caused. A
        repeat is the same command from the same sender again (unless it cannot come
        again: `redeliverable` False, an HTTP request's id made for it), or the same
        idempotency key in the tenant; with another description it is a conflict.
        """
        fresh = new_job_id()
        job_id = await self.store.claim(fresh, tenant, command, spec.idempotency_key, redeliverable)
        if job_id != fresh:  # a key claimed before: its job is stored, or to be stored now
            repeat = await self.store.repeated(job_id, tenant, spec, command)
            if repeat is not None:
                return repeat
        now = utcnow()
        stub: JobHead = {"_id": job_id, "tenant": tenant, "actor": actor, "attempt": 0,
                         "node_id": None, "command": command}  # fmt: skip
        history: list[HistoryEntry] = [
            {"state": JobState.submitted.value, "at": now, "reason": None},
            {"state": JobState.queued.value, "at": now, "reason": "waiting for a node"},
        ]
        outbox = [
            self._job_event(stub, JobState.submitted, None, None, None),
            self._job_event(stub, JobState.queued, JobState.submitted, "waiting for a node", None),
        ]
        if spec.inputs:
            reason = f"staging {len(spec.inputs)} inputs"
            history.append({"state": JobState.staging.value, "at": now, "reason": reason})
            outbox.append(self._job_event(stub, JobState.staging, JobState.queued, reason, None))
            outbox.append(
                self._command(stub, "data.stage", DataStage(job_id=job_id, inputs=spec.inputs))
            )
        # A job that can run now, while none waits before it, is placed as it is stored.
        node_id = None if spec.inputs else await self.place_at_once(job_id, tenant, spec)
        then = None if node_id is None else (lambda job: self._placement(job, node_id))
        try:
            with self.admission.ticket(tenant) if self.admission else nullcontext():
                submission = await self.store.insert_job(
                    job_id, tenant, actor, spec, command, history, outbox, then
                )
        finally:
            if node_id is not None:
                self.let_go(job_id)  # the stored job holds its room now, if it was stored
        if submission.created:
            await self.relay.flush(job_id, submission.job["outbox"])
            if node_id is None:
                self.wake_placer()
        return submission

    async def cancel(
        self, job_id: str, tenant: str, reason: str, causation_id: str | None = None
    ) -> JobDocument:
        """Cancel now if not yet placed; otherwise ask the node and let it report."""
        job = await self.store.current(job_id, fresh=True)
        if job is None or job["tenant"] != tenant:
            raise JobNotFound(job_id)
        state = JobState(job["state"])
        if state.terminal:
            raise JobFinished(state.value)
        never_ran = state == JobState.dispatched and job.get("grant_pending")
        if state in (JobState.submitted, JobState.queued, JobState.staging, JobState.lost) or (
            never_ran
        ):
            moved = await self._move(
                job_id,
                JobState.cancelled,
                reason,
                causation_id=causation_id,
                expect={"state": state.value},
                current=job,
            )
        elif job.get("cancel_requested"):
            return job
        else:

            def node_cancel(current: JobDocument) -> list[OutboxEntry]:
                cancel = NodeCancel(job_id=job_id, attempt=current["attempt"], reason=reason)
                return [self._command(current, "node.cancel", cancel)]

            moved = await self.annotate(
                job_id,
                {"cancel_requested": reason},
                expect={"state": state.value, "attempt": job["attempt"]},
                commands=node_cancel,
            )
        if moved is not None:
            return moved
        return await self.cancel(job_id, tenant, reason, causation_id)  # it moved meanwhile

    async def dispatch(self, job_id: str, node_id: str) -> bool:
        """Place a waiting job on a node and send it there; False if it no longer waits."""

        def decide(job: JobDocument) -> Change | None:
            state = JobState(job["state"])
            staged = state == JobState.staging and job.get("inputs_staged") is True
            if state != JobState.queued and not staged:
                return None
            return self._placement(job, node_id)

        return await self._write(job_id, decide) is not None

    def _placement(self, job: JobDocument, node_id: str) -> Change | None:
        """The change that places the job on `node_id`, with its first command there
        (or, for a job with data, to the datacache to let the node read)."""
        spec = JobSpec.model_validate(job["spec"])
        deadline = utcnow() + timedelta(seconds=spec.walltime_s)
        attempt = job["attempt"] + 1

        def first_command(merged: JobDocument) -> list[OutboxEntry]:
            if spec.needs_data:  # the node gets the job once the datacache lets it read
                grant = DataGrant(
                    job_id=job["_id"],
                    attempt=attempt,
                    node_id=node_id,
                    expires_at=deadline,
                    upload_until=deadline + self.upload_grace,
                )
                return [self._command(merged, "data.grant", grant)]
            return [self._run_command(merged)]

        placed = {"node_id": node_id, "attempt": attempt, "deadline": deadline,
                  "grant_pending": spec.needs_data}  # fmt: skip
        reason = f"placed on {node_id}"
        return self._transition(job, JobState.dispatched, reason, None, placed, first_command)

    def _run_command(self, job: JobDocument) -> OutboxEntry:
        run = NodeRun(
            job_id=job["_id"],
            attempt=job["attempt"],
            tenant=job["tenant"],
            spec=JobSpec.model_validate(job["spec"]),
            deadline=job["deadline"],
        )
        # One node.run per attempt, with the id the node's reports name as their cause.
        return self._command(job, "node.run", run, id=run_command_id(job["_id"], job["attempt"]))

    async def granted(self, job_id: str, attempt: int, node_id: str) -> None:
        """The datacache granted the node access: now send it the job."""
        expect = {"state": JobState.dispatched.value, "attempt": attempt, "node_id": node_id,
                  "grant_pending": True}  # fmt: skip
        # Anything else is a late or repeated grant.
        await self.annotate(
            job_id, {"grant_pending": False}, expect=expect,
            commands=lambda job: [self._run_command(job)],
        )  # fmt: skip

    # -- node reports -------------------------------------------------------------

    async def run_started(self, report: RunStarted, causation_id: str) -> None:
        await self._move(
            report.job_id,
            JobState.running,
            f"started on {report.node_id}",
            causation_id=causation_id,
            expect={"attempt": report.attempt, "node_id": report.node_id},
        )

    async def run_interactive(self, report: RunInteractive, causation_id: str) -> None:
        """The guest's ports are forwarded: store where to connect, announce it."""

        def decide(job: JobDocument) -> Change | None:
            if (job.get("attempt"), job.get("node_id")) != (report.attempt, report.node_id):
                return None  # an older attempt's report
            if job["state"] != JobState.running.value or job.get("interactive") == report.endpoints:
                return None  # ended meanwhile, or a repeated report (an agent restarted)
            ready = JobInteractive(
                job_id=report.job_id, attempt=report.attempt, endpoints=report.endpoints
            )
            envelope = self.bus.envelope(
                "job.interactive_ready",
                ready,
                correlation_id=job["_id"],
                causation_id=causation_id,
                tenant=job["tenant"],
            )
            connect = ", ".join(f"{name} {where}" for name, where in report.endpoints.items())
            note: HistoryEntry = {"state": job["state"], "at": utcnow(),
                                  "event": "job.interactive_ready",
                                  "reason": f"connect to {connect}"}  # fmt: skip
            return Change({"interactive": report.endpoints}, [note], [outbox_entry(envelope)])

        await self._write(report.job_id, decide)

    async def run_finished(self, report: RunFinished, causation_id: str) -> None:
        def decide(job: JobDocument) -> Change | None:
            if (job.get("attempt"), job.get("node_id")) != (report.attempt, report.node_id):
                log.info("stale_run_report", job_id=report.job_id, attempt=report.attempt)
                return None
            state = OUTCOME_STATES[report.outcome]
            reason = report.reason
            if job.get("walltime_enforced_at") is not None and state != JobState.succeeded:
                state, reason = JobState.timed_out, "walltime exceeded"
            elif job.get("cancel_requested") and state != JobState.succeeded:
                state, reason = JobState.cancelled, job["cancel_requested"]
            elif state == JobState.failed and reason is None:
                reason = f"exited with code {report.exit_code}"
            fields: dict[str, Any] = {"exit_code": report.exit_code, "reason": reason}
            if report.oom_killed:
                fields["oom_killed"] = True
            if report.outputs:  # listed with the end itself: a finished job shows its results
                files = [item.model_dump(mode="json") for item in report.outputs]
                fields["outputs"] = {
                    "attempt": report.attempt,
                    "files": files,
                    "bytes": sum(item.size for item in report.outputs),
                }
            return self._transition(job, state, reason, causation_id, fields)

        await self._write(report.job_id, decide)

    async def fail(self, job_id: str, reason: str, causation_id: str) -> None:
        """End a job that cannot run (its data could not be staged or granted)."""
        await self._move(job_id, JobState.failed, reason, causation_id=causation_id)

    # -- the watchdog's decisions -------------------------------------------------

    async def lose(self, job: JobDocument, reason: str) -> None:
        """The job's node is gone: mark it lost, then queue it again or end it."""
        lost = await self._move(
            job["_id"], JobState.lost, reason, expect={"attempt": job["attempt"]}
        )
        if lost is None:
            return
        spec = JobSpec.model_validate(lost["spec"])
        if lost.get("cancel_requested"):
            await self._move(job["_id"], JobState.cancelled, lost["cancel_requested"])
        elif lost["attempt"] <= spec.retries:
            await self._move(
                job["_id"],
                JobState.queued,
                f"retry {lost['attempt']} of {spec.retries} after: {reason}",
            )
        else:
            await self._move(job["_id"], JobState.failed, f"{reason}; no retries left")

    async def enforce_walltime(self, job: JobDocument) -> None:
        """Ask the node to stop a job past its deadline (the node normally does it)."""

        def node_cancel(current: JobDocument) -> list[OutboxEntry]:
            stop = NodeCancel(job_id=job["_id"], attempt=job["attempt"], reason="walltime exceeded")
            return [self._command(current, "node.cancel", stop)]

        expect = {"state": job["state"], "attempt": job["attempt"]}
        await self.annotate(
            job["_id"], {"walltime_enforced_at": utcnow()}, expect=expect, commands=node_cancel
        )

    async def time_out(self, job: JobDocument) -> None:
        """The node did not confirm the stop in time: end the job here."""
        await self._move(
            job["_id"],
            JobState.timed_out,
            f"walltime exceeded; node {job['node_id']} did not confirm the stop",
            expect={"attempt": job["attempt"]},
        )


def _has(job: Mapping[str, Any], expect: dict[str, Any] | None) -> bool:
    """Whether the job has each of these (top-level) field values; missing is None."""
    return all(job.get(key) == value for key, value in (expect or {}).items())
