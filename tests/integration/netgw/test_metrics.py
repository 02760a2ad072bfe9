"""netgw's `/metrics`: how full its address pool and port range are, the requests it
handled; and who may read them (netgw has no API, but its metrics are not public)."""

from __future__ import annotations

import uuid

from shared.auth import Role
from shared.bus import Bus
from shared.messages.net import NetLeased, NetReleased
from shared.settings import MongoSettings
from tests.helpers import bearer, make_token
from tests.integration.netgw.test_gateway import lease, release
from tests.processes import Stack
from tests.scrape import scrape, scrape_until, status_of


async def test_metrics_show_the_pools_in_use_and_need_a_metrics_token(
    netgw: Stack, bus: Bus, mongo_settings: MongoSettings
) -> None:
    await netgw.start("netgw", MEDHIVE_MONGO_IDENTITY_DB=mongo_settings.identity_db)
    url = f"http://127.0.0.1:{netgw.ports['netgw']}/metrics"
    token = await make_token(mongo_settings, "_metrics", Role.metrics)
    metrics = bearer(token)
    assert await status_of(url, {}) == 401
    assert await status_of(url, bearer(await make_token(mongo_settings, "radiology"))) == 403
    assert await status_of(url.replace("/metrics", "/v1/anything"), metrics) == 403
    idle = await scrape(url, token)
    assert idle.value("medhive_netgw_leases_in_use") == 0
    assert idle.value("medhive_netgw_lease_pool_size") > 0
    assert idle.value("medhive_netgw_ports_in_use") == 0
    assert idle.value("medhive_netgw_port_range_size") == 100  # 41000-41099 (conftest)

    job = f"job-{uuid.uuid4().hex[:8]}"
    assert isinstance(await lease(bus, job), NetLeased)
    assert (await scrape(url, token)).value("medhive_netgw_leases_in_use") == 1
    handled = {"type": "net.lease", "outcome": "ok"}  # counted once acknowledged, after the reply
    await scrape_until(
        url, token, lambda s: s.value("medhive_messages_handled_total", **handled) == 1
    )

    assert isinstance(await release(bus, job), NetReleased)
    assert (await scrape(url, token)).value("medhive_netgw_leases_in_use") == 0
