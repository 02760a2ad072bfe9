"""The node agent's `/metrics`: its capacity, what the runs it watches reserve of it,
the commands it handled; and who may read them (the agent has no API, but its metrics
are not public)."""

from __future__ import annotations

import aiodocker

from services.vmnode.settings import NodeSettings
from shared.auth import Role
from shared.bus import Bus
from shared.settings import MongoSettings
from tests.helpers import bearer, make_token
from tests.integration.vmnode.conftest import (
    GATED,
    Events,
    new_job,
    node_run,
    release,
    running_agent,
    send_run,
    sh,
)
from tests.scrape import scrape, scrape_until, status_of

MIB = 1024 * 1024


async def test_metrics_show_the_capacity_a_run_reserves_until_it_ends(
    settings: NodeSettings,
    mongo_settings: MongoSettings,
    scheduler: Bus,
    events: Events,
    docker: aiodocker.Docker,
) -> None:
    job = new_job()
    token = await make_token(mongo_settings, "_metrics", Role.metrics)
    node = {"node": settings.node_id}
    async with running_agent(settings.model_copy(update={"mongo": mongo_settings})) as server:
        url = server.make_url("/metrics")
        idle = await scrape(url, token)
        assert idle.value("medhive_vmnode_capacity_cpus", **node) == 2
        assert idle.value("medhive_vmnode_capacity_memory_bytes", **node) == 2048 * MIB
        assert idle.value("medhive_vmnode_runs", **node) == 0

        await send_run(scheduler, settings.node_id, node_run(job, sh(GATED), memory_mb=64))
        started = await events.wait_for("run.started", job)
        busy = await scrape(url, token)
        assert busy.value("medhive_vmnode_runs", **node) == 1
        assert busy.value("medhive_vmnode_reserved_cpus", **node) == 0.5
        assert busy.value("medhive_vmnode_reserved_memory_bytes", **node) == 64 * MIB

        await release(docker, started.payload["workload_id"])
        await events.wait_for("run.finished", job)
        done = await scrape_until(url, token, lambda s: s.value("medhive_vmnode_runs") == 0)
        assert done.value("medhive_vmnode_reserved_cpus", **node) == 0
        handled = {"queue": f"node.{settings.node_id}", "type": "node.run", "outcome": "ok"}
        assert done.value("medhive_messages_handled_total", **handled) == 1


async def test_metrics_need_a_metrics_or_operator_token_which_reads_nothing_else(
    settings: NodeSettings, mongo_settings: MongoSettings
) -> None:
    metrics = bearer(await make_token(mongo_settings, "_metrics", Role.metrics))
    async with running_agent(settings.model_copy(update={"mongo": mongo_settings})) as server:
        url = server.make_url("/metrics")
        assert await status_of(url, {}) == 401
        assert await status_of(url, bearer(await make_token(mongo_settings, "radiology"))) == 403
        assert await status_of(url, metrics) == 200
        assert await status_of(server.make_url("/v1/anything"), metrics) == 403
        assert await status_of(server.make_url("/healthz"), {}) == 200
