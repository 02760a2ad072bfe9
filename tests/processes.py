"""Services as real child processes (`python -m services.<name>`), as a user runs them:
each with its own log file, killable and restartable by a test."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from medhive.processes import Child, spawn, tail, until_healthy

#: Seconds a service gets to exit after SIGTERM (or to be gone after SIGKILL).
STOP_WITHIN_S = 30


class Stack:
    """medhive services (scheduler, audit, datacache, node agents, netgw), each a child
    process with its own log file."""

    def __init__(self, env: dict[str, str], logs: Path, node_id: str) -> None:
        self.env = env
        self.node_id = node_id
        self.logs = logs
        self.processes: dict[str, Child] = {}
        self.ports: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.modules: dict[str, str] = {}

    def url(self, service: str) -> str:
        """Where `service`'s HTTP API answers, as the shared environment sets its port."""
        return f"http://127.0.0.1:{self.env[f'MEDHIVE_{service.upper()}_PORT']}"

    @property
    def api(self) -> str:
        return self.url("scheduler")

    @property
    def audit(self) -> str:
        return self.url("audit")

    @property
    def datacache(self) -> str:
        return self.url("datacache")

    @property
    def work_dir(self) -> Path:
        return Path(self.env["MEDHIVE_VMNODE_WORK_DIR"])

    @property
    def cache_dir(self) -> Path:
        return Path(self.env["MEDHIVE_DATACACHE_CACHE_DIR"])

    async def start(
        self, name: str, module: str | None = None, *, healthy: bool = True, **overrides: str
    ) -> None:
        """Start `services.<module>` (default: the name) with env overrides, until healthy
        (or not waiting for that: a standby scheduler does not answer until it acts)."""
        module = module or name
        env = {**self.env, **overrides}
        prefix = module.upper()
        self.ports[name] = env[f"MEDHIVE_{prefix}_PORT"]
        self.envs[name] = env
        await self._spawn(name, module, healthy=healthy)

    async def restart(self, name: str) -> None:
        await self._spawn(name, self.modules[name])

    async def _spawn(self, name: str, module: str, healthy: bool = True) -> None:
        self.modules[name] = module
        argv = [sys.executable, "-m", f"services.{module}"]
        log = self.logs / f"{name}.log"
        self.processes[name] = spawn(name, argv, env=self.envs[name], log=log)
        if healthy:
            await self.healthy(name)

    async def healthy(self, name: str) -> None:
        """Wait until the service answers its health check."""
        url = f"http://127.0.0.1:{self.ports[name]}/healthz"
        await until_healthy(self.processes[name], url)

    async def configure_sources(self, sources: list[dict[str, Any]]) -> None:
        """Give the datacache these sources (tenant, match, credentials) and restart it."""
        path = Path(self.env["MEDHIVE_DATACACHE_SOURCES_FILE"])
        path.write_text(json.dumps({"sources": sources}))  # YAML reads JSON
        self.stop("datacache")
        await self.restart("datacache")

    def kill(self, name: str) -> None:
        """SIGKILL: no graceful shutdown, as when a host loses power."""
        self.processes.pop(name).kill(STOP_WITHIN_S)

    def stop(self, name: str) -> None:
        """SIGTERM, the graceful shutdown; SIGKILL if it takes too long."""
        self.processes.pop(name).stop(STOP_WITHIN_S)

    def log(self, name: str) -> str:
        return tail(self.logs / f"{name}.log", 20000)
