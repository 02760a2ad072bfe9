"""`medhive webhooks`: add, list, test and remove, as a user types them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from aiohttp.test_utils import TestClient

from services.scheduler.app import create_app
from services.scheduler.settings import SchedulerSettings
from shared.settings import MongoSettings
from tests.helpers import make_token
from tests.integration.scheduler.webhook_support import Receiver, quick


async def test_the_cli_adds_lists_tests_and_removes_a_webhook(
    scheduler_settings: SchedulerSettings, aiohttp_client: Any, mongo_settings: MongoSettings
) -> None:
    hooks: TestClient = await aiohttp_client(create_app(quick(scheduler_settings)))
    token = await make_token(mongo_settings, "radiology")
    env = {**os.environ, "MEDHIVE_API_URL": str(hooks.make_url("")), "MEDHIVE_TOKEN": token}

    async def medhive(*args: str) -> str:
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "medhive", "webhooks", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    receiver = Receiver()
    await receiver.start()
    try:
        added = json.loads(
            await medhive("add", receiver.url, "--event", "job.succeeded", "--event", "job.failed")
        )
        receiver.secret = added["secret"]
        assert (await medhive("list")).split() == [
            added["id"], "job.failed,job.succeeded", receiver.url
        ]  # fmt: skip
        queued = await medhive("test", added["id"])
        await receiver.wait_for(lambda r: len(r.accepted) == 1)
    finally:
        await receiver.stop()
    (body,) = receiver.accepted.values()
    assert body["type"] == "webhook.test"
    assert next(iter(receiver.accepted)) in queued
    assert added["id"] in await medhive("remove", added["id"])
    assert await medhive("list") == ""
