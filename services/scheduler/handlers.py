"""Message handlers: commands from other systems, and the reports of node agents."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from services.scheduler.jobs import JobFinished, JobNotFound, JobService
from services.scheduler.store import IdempotencyConflict, JobStore
from shared.bus import Incoming, Rejected
from shared.envelope import Envelope
from shared.messages.jobs import JobCancel, JobSubmit
from shared.messages.nodes import NodeStatus, RunFinished, RunInteractive, RunOutput, RunStarted

log = structlog.get_logger("medhive.scheduler.handlers")


def tenant_of_sender(amqp_tenants: dict[str, str]) -> Callable[[Envelope, str | None], Envelope]:
    """Commands count for the tenant their AMQP user maps to, whatever they claim.

    RabbitMQ refuses a `user_id` property that differs from the connection's user, so
    the property is proof of who sent the message.
    """

    def authorize(envelope: Envelope, user_id: str | None) -> Envelope:
        if not user_id:
            raise Rejected("message has no user_id property; set it to your AMQP user name")
        tenant = amqp_tenants.get(user_id)
        if tenant is None:
            raise Rejected(f"AMQP user {user_id!r} is not mapped to a tenant")
        return envelope.model_copy(update={"tenant": tenant, "actor": envelope.actor or user_id})

    return authorize


class CommandHandlers:
    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    async def submit(self, msg: Incoming) -> None:
        assert isinstance(msg.payload, JobSubmit) and msg.envelope.tenant is not None
        try:
            await self.jobs.submit(
                msg.envelope.tenant,
                msg.envelope.actor,
                msg.payload.spec,
                causation_id=str(msg.envelope.id),
            )
        except IdempotencyConflict as exc:
            raise Rejected(
                f"idempotency key {msg.payload.spec.idempotency_key!r} already names job "
                f"{exc.args[0]} with a different description"
            ) from exc

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
