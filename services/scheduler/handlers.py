"""Message handlers: commands from other systems, and the reports of node agents."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.scheduler.jobs import JobFinished, JobNotFound, JobService
from services.scheduler.store import IdempotencyConflict, JobStore, Submission
from services.scheduler.tenants import QueueFull
from shared.bus import Bus, Incoming, Rejected
from shared.consume import Authorizer
from shared.envelope import derived_id
from shared.identity import AmqpUsers, Sender
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

    async def submit(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, JobSubmit) and msg.envelope.tenant is not None
        command = {"id": str(msg.envelope.id), "sender": msg.sender.user}
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

    async def _answer_repeat(self, msg: Incoming, submission: Submission) -> None:
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

    async def cancel(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, JobCancel) and msg.envelope.tenant is not None
        try:
            await self.jobs.cancel(
                msg.payload.job_id, msg.envelope.tenant, msg.payload.reason, str(msg.envelope.id)
            )
        except JobNotFound as exc:
            raise Rejected(f"no job {msg.payload.job_id} for this tenant") from exc
        except JobFinished:
            return  # cancelling a finished job changes nothing; not an error worth a letter


class NodeHandlers:
    def __init__(self, jobs: JobService, store: JobStore, log_limit: int, wake: Callable[[], None]):
        self.jobs = jobs
        self.store = store
        self.log_limit = log_limit
        self.wake = wake

    async def status(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, NodeStatus)
        online = msg.envelope.type != "node.offline"
        await self.store.node_seen(msg.payload.node_id, msg.payload.model_dump(), online)
        if msg.envelope.type != "node.heartbeat":
            log.info(msg.envelope.type.replace(".", "_"), node_id=msg.payload.node_id,
                     cpus=msg.payload.cpus, memory_mb=msg.payload.memory_mb)  # fmt: skip
        if msg.envelope.type == "node.online" or (online and not msg.redelivered):
            self.wake()

    async def started(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, RunStarted)
        await self.jobs.run_started(msg.payload, str(msg.envelope.id))

    async def interactive(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, RunInteractive)
        await self.jobs.run_interactive(msg.payload, str(msg.envelope.id))

    async def output(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, RunOutput)
        p = msg.payload
        await self.store.save_output(
            p.job_id, p.attempt, p.stream, p.data, p.truncated, self.log_limit
        )

    async def finished(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, RunFinished)
        await self.jobs.run_finished(msg.payload, str(msg.envelope.id))
