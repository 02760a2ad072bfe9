"""Services as real child processes (`python -m services.<name>`), as a user runs them:
each with its own log file, killable and restartable by a test."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp


class Stack:
    """medhive services (scheduler, audit, datacache, node agents, netgw), each a child
    process with its own log file."""

    def __init__(self, env: dict[str, str], logs: Path, node_id: str) -> None:
        self.env = env
        self.node_id = node_id
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, str] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.modules: dict[str, str] = {}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['MEDHIVE_SCHEDULER_PORT']}"

    @property
    def audit(self) -> str:
        return f"http://127.0.0.1:{self.env['MEDHIVE_AUDIT_PORT']}"

    @property
    def datacache(self) -> str:
        return f"http://127.0.0.1:{self.env['MEDHIVE_DATACACHE_PORT']}"

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
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{module}"],
                env=self.envs[name], stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        if healthy:
            await self.healthy(name)

    async def healthy(self, name: str) -> None:
        """Wait until the service answers its health check."""
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
