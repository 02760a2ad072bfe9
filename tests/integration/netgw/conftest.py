"""netgw as a real process managing a gateway namespace (the tests send it a node's
requests on `bus`, from tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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
