"""Builds the node agent's app: the shared service wiring plus the agent's own contexts.

Start order: runtime, agent (adopts leftover workloads), consumer, heartbeat
(`node.online`). The node's queue must exist before the node announces itself: the
scheduler dispatches to it at once, and a command routed to a queue that is not there
yet would be unroutable. Shutdown runs in reverse: `node.offline`, stop consuming, stop
watching (the workloads keep running for the next agent), close the runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from services.vmnode.agent import CANCEL_REPORT_S, Agent
from services.vmnode.guestnet import GuestNetwork
from services.vmnode.handlers import COMMANDS
from services.vmnode.heartbeat import Heartbeat
from services.vmnode.metrics import NodeCollector
from services.vmnode.runtimes import Runtime, create_runtime
from services.vmnode.settings import NodeSettings
from shared.metrics import METRICS
from shared.service import BUS, create_service_app

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
AGENT = web.AppKey("agent", Agent)
HEARTBEAT = web.AppKey("heartbeat", Heartbeat)


def create_app(settings: NodeSettings) -> web.Application:
    """The node agent's app; it does no I/O until started."""
    app = create_service_app("vmnode", settings.amqp, settings.mongo)

    async def runtime(app: web.Application) -> AsyncIterator[None]:
        app[RUNTIME] = create_runtime(settings, GuestNetwork(app[BUS], settings.node_id))
        yield
        await app[RUNTIME].close()

    async def agent(app: web.Application) -> AsyncIterator[None]:
        app[AGENT] = Agent(app[BUS], app[RUNTIME], settings)
        await app[AGENT].adopt()
        app[METRICS].add(NodeCollector(app[AGENT]))
        yield
        await app[AGENT].detach()
        await app[AGENT].data.close()

    async def heartbeat(app: web.Application) -> AsyncIterator[None]:
        runtime = app[RUNTIME]
        app[HEARTBEAT] = Heartbeat(
            app[BUS], settings, app[AGENT].running, list(runtime.kinds), runtime.capacity
        )
        await app[HEARTBEAT].start()
        yield
        await app[HEARTBEAT].stop()

    async def consumer(app: web.Application) -> AsyncIterator[None]:
        agent = app[AGENT]
        consumer = await app[BUS].consume(
            COMMANDS, agent, authorize=agent.authorize, node_id=settings.node_id
        )
        yield
        # Bounded by what a `node.cancel` in hand may take to stop its run and report.
        await consumer.stop(grace_s=settings.stop_grace_s + CANCEL_REPORT_S)

    app.cleanup_ctx.extend([runtime, agent, consumer, heartbeat])
    return app
