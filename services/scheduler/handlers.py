"""What the scheduler consumes: commands from other systems, the reports of node agents
and the datacache, and its tenants' job events for their webhooks.

The three tables at the end are the only place the scheduler names the message types
it takes (`shared.handlers`).

Of the datacache's reports, `data.staged` makes a staging job eligible for placement;
`data.granted` releases the job to its node; `data.failed` ends the job with the
reason. Progress, results and uploads are recorded on the job for the API, without
changing its state.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.scheduler.deliveries import Deliveries
from services.scheduler.documents import HistoryNote, JobCommand
from services.scheduler.jobs import JobFinished, JobNotFound, JobService
from services.scheduler.nodes import NodeStore
from services.scheduler.output import OutputStore
from services.scheduler.store import IdempotencyConflict, Submission
from services.scheduler.tenants import QueueFull
from services.scheduler.webhooks import JOB_EVENTS
from shared import topology
from shared.bus import Bus
from shared.consume import Authorizer, Incoming, Rejected
from shared.envelope import derived_id
from shared.handlers import HandlerTable, on
from shared.identity import AmqpUsers, Sender
from shared.messages.catalog import CATALOG
from shared.messages.data import (
    DataFailed,
    DataGranted,
    DataOutputs,
    DataProgress,
    DataStaged,
    DataUploaded,
)
from shared.messages.jobs import JobCancel, JobDuplicate, JobState, JobSubmit
from shared.messages.nodes import NodeStatus, RunFinished, RunInteractive, RunOutput, RunStarted

log = structlog.get_logger("medhive.scheduler.handlers")


def integrators(users: AmqpUsers) -> Authorizer:
    """Commands count for the tenant their AMQP user acts for, whatever they claim.

    RabbitMQ refuses a `user_id` property that differs from the connection's user, so
    the property is proof of who sent the message.
    """

    async def identify(user_id: str | None) -> Sender:
        if not user_id:
            raise Rejected("message has no user_id property; set it to your AMQP user name")
        tenant = await users.tenant_of(user_id)
        if tenant is None:
            raise Rejected(f"AMQP user {user_id!r} is not mapped to a tenant")
        return Sender(user_id, tenant)

    return identify


class CommandHandlers:
    def __init__(self, jobs: JobService, bus: Bus) -> None:
        self.jobs = jobs
        self.bus = bus

    async def submit(self, msg: Incoming[JobSubmit]) -> None:
        # Both set by `integrators`, which refuses a message without a user id.
        assert msg.envelope.tenant is not None and msg.sender.user is not None
        command: JobCommand = {"id": str(msg.envelope.id), "sender": msg.sender.user}
        try:
            submission = await self.jobs.submit(
                msg.envelope.tenant, msg.envelope.actor, msg.payload.spec, command
            )
        except IdempotencyConflict as exc:
            job_id, matched_by = exc.args
            what = (
                f"message id {msg.envelope.id}"
                if matched_by == "message_id"
                else f"idempotency key {msg.payload.spec.idempotency_key!r}"
            )
            raise Rejected(
                f"{what} already names job {job_id} with a different description"
            ) from exc
        except QueueFull as exc:
            raise Rejected(str(exc)) from exc
        if not submission.created:
            await self._answer_repeat(msg, submission)

    async def _answer_repeat(self, msg: Incoming[JobSubmit], submission: Submission) -> None:
        """Tell the sender which job its repeated command made (on its tenant's channel)."""
        job = submission.job
        assert submission.matched_by in ("message_id", "idempotency_key")
        repeat = JobDuplicate(
            job_id=job["_id"], state=JobState(job["state"]), matched_by=submission.matched_by
        )
        log.info("submit_repeated", existing_job=job["_id"], matched_by=submission.matched_by)
        await self.bus.emit(
            "job.duplicate",
            repeat,
            id=derived_id("job.duplicate", msg.sender.user, msg.envelope.id),
            correlation_id=job["_id"],
            causation_id=str(msg.envelope.id),
            tenant=job["tenant"],
            actor=msg.envelope.actor,
        )

    async def cancel(self, msg: Incoming[JobCancel]) -> None:
        assert msg.envelope.tenant is not None  # the integrator's, set by `integrators`
        try:
            await self.jobs.cancel(
                msg.payload.job_id, msg.envelope.tenant, msg.payload.reason, str(msg.envelope.id)
            )
        except JobNotFound as exc:
            raise Rejected(f"no job {msg.payload.job_id} for this tenant") from exc
        except JobFinished:
            return  # cancelling a finished job changes nothing; not an error worth a letter


class ReportHandlers:
    """Node agents' reports and the datacache's; `wake` starts a placement pass."""

    def __init__(
        self,
        jobs: JobService,
        nodes: NodeStore,
        logs: OutputStore,
        log_limit: int,
        wake: Callable[[], None],
    ) -> None:
        self.jobs = jobs
        self.nodes = nodes
        self.logs = logs
        self.log_limit = log_limit
        self.wake = wake

    async def status(self, msg: Incoming[NodeStatus]) -> None:
        online = msg.envelope.type != "node.offline"
        await self.nodes.node_seen(msg.payload.node_id, msg.payload.model_dump(), online)
        if msg.envelope.type != "node.heartbeat":
            log.info(msg.envelope.type.replace(".", "_"), node_id=msg.payload.node_id,
                     cpus=msg.payload.cpus, memory_mb=msg.payload.memory_mb)  # fmt: skip
        if msg.envelope.type == "node.online" or (online and not msg.redelivered):
            self.wake()

    async def started(self, msg: Incoming[RunStarted]) -> None:
        await self.jobs.run_started(msg.payload, str(msg.envelope.id))

    async def interactive(self, msg: Incoming[RunInteractive]) -> None:
        await self.jobs.run_interactive(msg.payload, str(msg.envelope.id))

    async def output(self, msg: Incoming[RunOutput]) -> None:
        p = msg.payload
        await self.logs.save_output(
            p.job_id, p.attempt, p.stream, p.data, p.truncated, self.log_limit
        )

    async def finished(self, msg: Incoming[RunFinished]) -> None:
        await self.jobs.run_finished(msg.payload, str(msg.envelope.id))

    async def staged(self, msg: Incoming[DataStaged]) -> None:
        p = msg.payload
        fields = {
            "inputs_staged": True,
            "staged_inputs": [item.model_dump(mode="json") for item in p.inputs],
            "staging_progress.done": True,
        }
        if await self.jobs.annotate(p.job_id, fields, expect={"state": JobState.staging.value}):
            self.wake()

    async def data_failed(self, msg: Incoming[DataFailed]) -> None:
        await self.jobs.fail(msg.payload.job_id, msg.payload.reason, str(msg.envelope.id))

    async def progress(self, msg: Incoming[DataProgress]) -> None:
        p = msg.payload
        # Reports of one job are handled in order (the consumer locks per job), so the
        # latest always wins.
        progress = {"input": p.input, "files": p.files, "bytes": p.bytes, "done": False}
        await self.jobs.annotate(
            p.job_id, {"staging_progress": progress}, expect={"state": JobState.staging.value}
        )

    async def granted(self, msg: Incoming[DataGranted]) -> None:
        p = msg.payload
        await self.jobs.granted(p.job_id, p.attempt, p.node_id)

    async def outputs(self, msg: Incoming[DataOutputs]) -> None:
        p = msg.payload
        files = [item.model_dump(mode="json") for item in p.files]
        outputs = {"attempt": p.attempt, "files": files, "bytes": p.bytes}
        await self.jobs.annotate(p.job_id, {"outputs": outputs})

    async def uploaded(self, msg: Incoming[DataUploaded]) -> None:
        p = msg.payload
        outcome = "uploaded" if p.ok else "upload failed"
        note: HistoryNote = {"event": "data.uploaded", "reason": f"results {outcome}: {p.detail}"}
        upload = {"destination": p.destination, "ok": p.ok, "detail": p.detail}
        await self.jobs.annotate(p.job_id, {"outputs_upload": upload}, note=note)


COMMANDS = HandlerTable(
    topology.SCHEDULER_COMMANDS,
    (
        on("job.submit", JobSubmit, CommandHandlers.submit),
        on("job.cancel", JobCancel, CommandHandlers.cancel),
    ),
)
REPORTS = HandlerTable(
    topology.SCHEDULER_REPORTS,
    (
        on("node.online", NodeStatus, ReportHandlers.status),
        on("node.heartbeat", NodeStatus, ReportHandlers.status),
        on("node.offline", NodeStatus, ReportHandlers.status),
        on("run.started", RunStarted, ReportHandlers.started),
        on("run.interactive", RunInteractive, ReportHandlers.interactive),
        on("run.output", RunOutput, ReportHandlers.output),
        on("run.finished", RunFinished, ReportHandlers.finished),
        on("data.staged", DataStaged, ReportHandlers.staged),
        on("data.failed", DataFailed, ReportHandlers.data_failed),
        on("data.progress", DataProgress, ReportHandlers.progress),
        on("data.granted", DataGranted, ReportHandlers.granted),
        on("data.outputs", DataOutputs, ReportHandlers.outputs),
        on("data.uploaded", DataUploaded, ReportHandlers.uploaded),
    ),
)
#: Every job event a webhook may ask for; bound per tenant, for tenants with webhooks.
WEBHOOK_EVENTS = HandlerTable(
    topology.SCHEDULER_WEBHOOKS,
    tuple(on(t, CATALOG[t].model, Deliveries.job_event) for t in JOB_EVENTS),
)
