"""The services as real processes (`python -m services.<name>`), as a user runs them,
on a fresh vhost and fresh databases, each one killable and restartable by a test."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.datacache.crypto import LocalKeyProvider
from shared.auth import Role
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import free_port
from tests.helpers import make_token


class Stack:
    """scheduler, audit, datacache and a node agent, each a child process with its own
    log file."""

    def __init__(self, env: dict[str, str], logs: Path, node_id: str) -> None:
        self.env = env
        self.node_id = node_id
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.modules: dict[str, str] = {}
        self.api = f"http://127.0.0.1:{env['MEDHIVE_SCHEDULER_PORT']}"
        self.audit = f"http://127.0.0.1:{env['MEDHIVE_AUDIT_PORT']}"
        self.datacache = f"http://127.0.0.1:{env['MEDHIVE_DATACACHE_PORT']}"
        self.work_dir = Path(env["MEDHIVE_VMNODE_WORK_DIR"])
        self.cache_dir = Path(env["MEDHIVE_DATACACHE_CACHE_DIR"])

    async def start(self, name: str, module: str | None = None, **overrides: str) -> None:
        """Start `services.<module>` (default: the name) with env overrides, until healthy."""
        module = module or name
        env = {**self.env, **overrides}
        prefix = module.upper()
        self.ports[name] = env[f"MEDHIVE_{prefix}_PORT"]
        self.envs[name] = env
        await self._spawn(name, module)

    async def restart(self, name: str) -> None:
        await self._spawn(name, self.modules[name])

    async def _spawn(self, name: str, module: str) -> None:
        self.modules[name] = module
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{module}"],
                env=self.envs[name], stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        await self._healthy(name, f"http://127.0.0.1:{self.ports[name]}/healthz")

    async def _healthy(self, name: str, url: str) -> None:
        async with aiohttp.ClientSession() as session, asyncio.timeout(60):
            while True:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

    async def configure_sources(self, sources: list[dict[str, Any]]) -> None:
        """Give the datacache these sources (tenant, match, credentials) and restart it."""
        path = Path(self.env["MEDHIVE_DATACACHE_SOURCES_FILE"])
        path.write_text(json.dumps({"sources": sources}))  # YAML reads JSON
        self.stop("datacache")
        await self.restart("datacache")

    def kill(self, name: str) -> None:
        """SIGKILL: no graceful shutdown, as when a host loses power."""
        process = self.processes.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-20000:]


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
    datacache_port = str(free_port())
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
        "MEDHIVE_AUDIT_PORT": str(free_port()),
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
