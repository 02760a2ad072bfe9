"""netgw as a real process managing a gateway namespace, and a bus to send it requests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import free_port
from tests.fixtures.vmnet import VmNet
from tests.processes import Stack


@pytest.fixture
async def netgw(
    vmnet: VmNet,
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    env = {
        **os.environ,
        **vmnet.netgw_env(),
        "MEDHIVE_AMQP_URL": amqp_settings.url.get_secret_value(),
        "MEDHIVE_MONGO_URL": mongo_settings.url.get_secret_value(),
        "MEDHIVE_NETGW_DATABASE": f"{db_prefix}netgw",
        "MEDHIVE_NETGW_PORT": str(free_port()),
        "MEDHIVE_NETGW_EXTERNAL_PORTS": "[41000, 41099]",
    }
    stack = Stack(env, tmp_path, "gateway")
    try:
        yield stack
    finally:
        for name in list(stack.processes):
            stack.stop(name)


@pytest.fixture
async def bus(amqp_settings: AmqpSettings) -> AsyncIterator[Bus]:
    """The bus a node agent uses to send netgw its requests."""
    bus = Bus(amqp_settings, "vmnode@test")
    await bus.connect()
    yield bus
    await bus.close()
