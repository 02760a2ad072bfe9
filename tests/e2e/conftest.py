"""The services as real processes (`python -m services.<name>`), as a user runs them,
on a fresh vhost and fresh databases, each one killable and restartable by a test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.datacache.crypto import LocalKeyProvider
from shared.auth import Role
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import free_port
from tests.helpers import make_token
from tests.processes import Stack


@pytest.fixture
async def stack(
    amqp_settings: AmqpSettings,
    mongo_settings: MongoSettings,
    db_prefix: str,
    amqp_user: tuple[str, str],
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    node_id = f"node-{db_prefix.rstrip('_')}"
    node_token = await make_token(mongo_settings, "_nodes", Role.node, name=node_id)
    datacache_port, audit_port = str(free_port()), str(free_port())
    key_file = tmp_path / "master.key"
    LocalKeyProvider.generate_key_file(key_file)
    sources = tmp_path / "sources.yaml"
    sources.write_text("sources: []\n")
    env = {
        **os.environ,
        "MEDHIVE_AMQP_URL": amqp_settings.url.get_secret_value(),
        "MEDHIVE_MONGO_URL": mongo_settings.url.get_secret_value(),
        "MEDHIVE_MONGO_IDENTITY_DB": mongo_settings.identity_db,
        "MEDHIVE_SCHEDULER_DATABASE": f"{db_prefix}scheduler",
        "MEDHIVE_SCHEDULER_PORT": str(free_port()),
        "MEDHIVE_SCHEDULER_AMQP_TENANTS": f'{{"{amqp_user[0]}": "radiology"}}',
        "MEDHIVE_SCHEDULER_NODE_TIMEOUT_S": "6",
        "MEDHIVE_SCHEDULER_WATCHDOG_INTERVAL_S": "0.5",
        "MEDHIVE_AUDIT_DATABASE": f"{db_prefix}audit",
        "MEDHIVE_AUDIT_PORT": audit_port,
        "MEDHIVE_SCHEDULER_AUDIT_URL": f"http://127.0.0.1:{audit_port}",
        "MEDHIVE_VMNODE_NODE_ID": node_id,
        "MEDHIVE_VMNODE_PORT": str(free_port()),
        "MEDHIVE_VMNODE_HEARTBEAT_S": "1",
        "MEDHIVE_VMNODE_CPUS": "2",
        "MEDHIVE_VMNODE_MEMORY_MB": "2048",
        "MEDHIVE_VMNODE_DATACACHE_URL": f"http://127.0.0.1:{datacache_port}",
        "MEDHIVE_VMNODE_DATACACHE_TOKEN": node_token,
        "MEDHIVE_VMNODE_WORK_DIR": str(tmp_path / "jobs"),
        "MEDHIVE_SCHEDULER_DATACACHE_URL": f"http://127.0.0.1:{datacache_port}",
        "MEDHIVE_DATACACHE_DATABASE": f"{db_prefix}datacache",
        "MEDHIVE_DATACACHE_PORT": datacache_port,
        "MEDHIVE_DATACACHE_CACHE_DIR": str(tmp_path / "cache"),
        "MEDHIVE_DATACACHE_MASTER_KEY_FILE": str(key_file),
        "MEDHIVE_DATACACHE_SOURCES_FILE": str(sources),
        "MEDHIVE_DATACACHE_FETCH_BACKOFF_S": "0.1",
    }
    stack = Stack(env, tmp_path, node_id)
    try:
        for name in ("audit", "scheduler", "datacache", "vmnode"):
            await stack.start(name)
        yield stack
    finally:
        for name in list(stack.processes):
            stack.stop(name)
        for node in (node_id, f"{node_id}-large"):
            remove = f"docker ps -aq --filter label=medhive.node={node} | xargs -r docker rm -f"
            subprocess.run(["sh", "-c", remove], check=False, capture_output=True)


@pytest.fixture
async def user_token(mongo_settings: MongoSettings) -> str:
    return await make_token(mongo_settings, "radiology", Role.user)


@pytest.fixture
async def operator_token(mongo_settings: MongoSettings) -> str:
    return await make_token(mongo_settings, "ops", Role.operator)
