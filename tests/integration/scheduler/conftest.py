from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import free_port


@pytest.fixture
def scheduler_settings(
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    amqp_user: tuple[str, str],
) -> SchedulerSettings:
    return SchedulerSettings(
        amqp=amqp_settings,
        mongo=mongo_settings,
        database=f"{db_prefix}scheduler",
        amqp_tenants={amqp_user[0]: "radiology"},
        watchdog_interval_s=0.2,
        walltime_grace_s=0.5,
        # No audit listens here: its routes, passed through for the console, answer 502.
        audit_url=f"http://127.0.0.1:{free_port()}",
    )


@pytest.fixture
async def scheduler(scheduler_settings: SchedulerSettings, aiohttp_client: Any) -> TestClient:
    # Settings first: their vhost must outlive the app, so it is set up before the client.
    client: TestClient = await aiohttp_client(create_app(scheduler_settings))
    return client
