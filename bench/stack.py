"""A whole medhive installation for one bench run, set up from nothing and torn down after.

`bench_stack()` is an async context manager that gives a running `Stack`:

- a fresh RabbitMQ vhost, made through the management API and deleted at the end;
- a SecantusDB (MongoDB-protocol) server as its own process, on a temporary directory;
- an operator and a user token, created with `shared.auth.TokenStore`;
- audit, scheduler and `nodes` node agents, each `python -m services.<name>` with its
  settings in the environment, as a user runs them, ready once `/healthz` answers.

On exit the services are stopped gracefully (SIGTERM) in reverse start order, then the
containers labelled `medhive.node=<node id>` are removed, the database server stopped,
the vhost deleted and the temporary directory removed (kept with `MEDHIVE_BENCH_KEEP=1`).
When set-up or the bench fails, the end of every service's log goes to stderr.

One module because `bench_stack` makes the parts of one installation in an order its
teardown must reverse (vhost, database, tokens, services, containers), and the
measurements every bench takes (`process_cpu_s`, `process_rss_mb`, `cpu_used`) read the
processes of that same `Stack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from medhive import localdb
from medhive.client import Client
from medhive.processes import Child, spawn, until_healthy, until_port
from shared.auth import Role, TokenStore
from shared.mongo import connect
from shared.settings import MongoSettings

RABBIT_HOST = os.environ.get("MEDHIVE_BENCH_RABBIT_HOST", "127.0.0.1")
RABBIT_ADMIN = os.environ.get("MEDHIVE_BENCH_RABBIT_ADMIN", "medhive:medhive")
MANAGEMENT = f"http://{RABBIT_HOST}:15672/api"
#: Seconds a process gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 60.0
#: The repository root: the services run from it, as `python -m services.<name>`.
ROOT = Path(__file__).resolve().parents[1]


def progress(message: str) -> None:
    """One progress line on stderr (stdout is kept for the result)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


#: RabbitMQ's process, by name: the Erlang VM.
RABBITMQ_PROCESS = "beam.smp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc/<pid>/status (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"process {pid} has no VmRSS (a zombie?)")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def named_cpu_s(name: str) -> float:
    """CPU seconds used so far by every process whose name (`comm`) is `name`: a server
    the bench did not start, such as RabbitMQ (`beam.smp`) or dockerd."""
    used = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                used += process_cpu_s(int(entry.name))
        except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
            continue
    return used


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine spent busy (not idle or waiting), /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(processes: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each of `processes` (name -> pid), RabbitMQ, this bench
    process (`bench`) and the whole machine (`machine`: anything else too); two of them
    make a `cpu_used`."""
    used = {name: process_cpu_s(pid) for name, pid in processes.items()}
    used["rabbitmq"] = named_cpu_s(RABBITMQ_PROCESS)
    used["bench"] = process_cpu_s(os.getpid())
    used["machine"] = machine_busy_s()
    return used


def cpu_used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process used between two `cpu_snapshot`s; `other` is
    the machine's busy time that none of them accounts for (dockerd, the kernel's
    workers, ...)."""
    delta = {name: round(after[name] - before[name], 2) for name in after if name in before}
    ours = sum(value for name, value in delta.items() if name != "machine")
    delta["other"] = round(delta["machine"] - ours, 2)
    return delta


@dataclass
class Stack:
    """A running installation: where its APIs are and who may call them."""

    api: str
    audit: str
    user_token: str
    operator_token: str
    vhost: str
    amqp_url: str
    mongo_url: str
    db_prefix: str  # the services' databases are <db_prefix>_<service>
    node_ids: list[str]
    workdir: Path
    processes: dict[str, Child] = field(default_factory=dict)
    #: one user token per tenant (`bench_stack(tenants=N)`); the first is `user_token`
    user_tokens: list[str] = field(default_factory=list)

    def client(self, token: str | None = None) -> Client:
        """An API client (the CLI's), with the user token unless another is given."""
        return Client(self.api, self.audit, token or self.user_token)

    def rss_mb(self) -> dict[str, float]:
        """RSS of the scheduler, the audit and the node agent (the largest, if several)."""
        nodes = [
            process_rss_mb(p.pid) for name, p in self.processes.items() if name.startswith("vmnode")
        ]
        return {
            "scheduler": process_rss_mb(self.processes["scheduler"].pid),
            "audit": process_rss_mb(self.processes["audit"].pid),
            "vmnode": max(nodes),
        }

    def cpu_s(self) -> dict[str, float]:
        """`cpu_snapshot` of the stack's processes."""
        return cpu_snapshot({name: p.pid for name, p in self.processes.items()})

    def check_alive(self) -> None:
        """Raise if a service died (a bench would otherwise wait for it forever)."""
        for name, process in self.processes.items():
            if (status := process.poll()) is not None:
                raise RuntimeError(f"{name} exited with {status}")

    def dump_logs(self) -> None:
        for process in self.processes.values():
            print(f"----- {process.name} ({process.log}) -----", file=sys.stderr)
            print(process.tail(4000), file=sys.stderr, flush=True)


# -- RabbitMQ ------------------------------------------------------------------------


async def _rabbit(session: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> None:
    async with session.request(method, MANAGEMENT + path, json=body) as response:
        if response.status >= 400 and not (method == "DELETE" and response.status == 404):
            raise RuntimeError(
                f"RabbitMQ {method} {path}: {response.status} {await response.text()}"
            )


async def rabbit_get(path: str) -> dict[str, Any]:
    """A GET of RabbitMQ's management API, as the bench's admin user."""
    user, password = RABBIT_ADMIN.split(":", 1)
    async with (
        aiohttp.ClientSession(auth=aiohttp.BasicAuth(user, password)) as session,
        session.get(MANAGEMENT + path) as response,
    ):
        response.raise_for_status()
        return dict(await response.json())


@contextlib.asynccontextmanager
async def _vhost(name: str) -> AsyncIterator[str]:
    """A fresh vhost the admin user may use fully; deleted (with its queues) at the end."""
    user, password = RABBIT_ADMIN.split(":", 1)
    auth = aiohttp.BasicAuth(user, password)
    async with aiohttp.ClientSession(auth=auth) as session:
        await _rabbit(session, "PUT", f"/vhosts/{name}")
        try:
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            await _rabbit(session, "PUT", f"/permissions/{name}/{user}", everything)
            yield f"amqp://{RABBIT_ADMIN}@{RABBIT_HOST}:5672/{name}"
        finally:
            await _rabbit(session, "DELETE", f"/vhosts/{name}")


# -- processes -----------------------------------------------------------------------


def start(name: str, argv: list[str], env: Mapping[str, str], log: Path) -> Child:
    """Start a process of the stack in the repository root, its output appended to `log`."""
    return spawn(name, argv, env=env, log=log, cwd=ROOT, stdin=subprocess.DEVNULL)


async def stop(process: Child) -> None:
    """SIGTERM (the services shut down gracefully on it), SIGKILL after a timeout."""
    if await process.stop_async(STOP_TIMEOUT_S):
        progress(f"{process.name} did not stop in {STOP_TIMEOUT_S:.0f} s; killed it")


async def _remove_containers(node_id: str) -> None:
    """Remove every container a node agent of this stack may have left behind."""
    listing = await asyncio.create_subprocess_exec(
        "docker", "ps", "-aq", "--filter", f"label=medhive.node={node_id}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await listing.communicate()
    ids = out.decode().split()
    if ids:
        progress(f"removing {len(ids)} leftover container(s) of {node_id}")
        remove = await asyncio.create_subprocess_exec(
            "docker", "rm", "-f", *ids,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await remove.wait()


async def _make_tokens(mongo_url: str, identity_db: str, tenants: int) -> tuple[list[str], str]:
    """(a user token for each of tenants `bench`, `bench-2`, ..., operator token), as
    `medhive token create` does."""
    settings = MongoSettings(url=SecretStr(mongo_url), identity_db=identity_db)
    client = connect(settings)
    try:
        tokens = TokenStore(client[identity_db])
        names = ["bench", *(f"bench-{i}" for i in range(2, tenants + 1))]
        users = [await tokens.create(f"{name}-user", name, Role.user) for name in names]
        operator = await tokens.create("bench-operator", "ops", Role.operator)
    finally:
        await client.close()
    return users, operator


async def _nodes_online(stack: Stack, session: aiohttp.ClientSession) -> None:
    """Wait until the scheduler lists every node agent as online."""
    headers = {"Authorization": f"Bearer {stack.user_token}"}
    async with asyncio.timeout(STARTUP_TIMEOUT_S):
        while True:
            async with session.get(f"{stack.api}/v1/nodes", headers=headers) as response:
                body = await response.json()
            online = {node["id"] for node in body.get("nodes", []) if node["online"]}
            if online >= set(stack.node_ids):
                return
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def bench_stack(
    *,
    nodes: int = 1,
    node_env: Mapping[str, str] | None = None,
    scheduler_env: Mapping[str, str] | None = None,
    audit_env: Mapping[str, str] | None = None,
    netgw_env: Mapping[str, str] | None = None,
    tenants: int = 1,
    schedulers: int = 1,
) -> AsyncIterator[Stack]:
    """Start a whole installation; `*_env` add or override `MEDHIVE_*` settings. netgw
    runs only when `netgw_env` is given (it needs a network to manage). `tenants` user
    tokens are made, one per tenant. Of `schedulers`, the first acts and the others
    stand by (`scheduler2`...: started, not waited for, as they do not answer)."""
    run_id = uuid.uuid4().hex[:10]
    workdir = Path(tempfile.mkdtemp(prefix=f"medhive-bench-{run_id}-"))
    keep = os.environ.get("MEDHIVE_BENCH_KEEP") == "1"
    stack: Stack | None = None
    async with contextlib.AsyncExitStack() as cleanup:
        if not keep:
            cleanup.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            cleanup.callback(progress, f"kept logs and data in {workdir}")
        try:
            progress(f"vhost bench-{run_id}")
            amqp_url = await cleanup.enter_async_context(_vhost(f"bench-{run_id}"))

            db_port = free_port()
            argv = localdb.argv("127.0.0.1", db_port, str(workdir / "db"))
            db = start("secantus", argv, os.environ, workdir / "secantus.log")
            cleanup.push_async_callback(stop, db)
            await until_port(db, db_port, within=STARTUP_TIMEOUT_S)
            mongo_url = f"mongodb://127.0.0.1:{db_port}/"
            progress(f"SecantusDB on port {db_port}")

            identity_db = f"bench{run_id}_identity"
            user_tokens, operator_token = await _make_tokens(mongo_url, identity_db, tenants)

            ports = {"scheduler": free_port(), "audit": free_port()}
            node_ids = [f"bench-{run_id}-n{i + 1}" for i in range(nodes)]
            stack = Stack(
                api=f"http://127.0.0.1:{ports['scheduler']}",
                audit=f"http://127.0.0.1:{ports['audit']}",
                user_token=user_tokens[0],
                operator_token=operator_token,
                vhost=f"bench-{run_id}",
                amqp_url=amqp_url,
                mongo_url=mongo_url,
                db_prefix=f"bench{run_id}",
                node_ids=node_ids,
                workdir=workdir,
                user_tokens=user_tokens,
            )
            stack.processes["db"] = db
            base = {
                **os.environ,
                "MEDHIVE_AMQP_URL": amqp_url,
                "MEDHIVE_MONGO_URL": mongo_url,
                "MEDHIVE_MONGO_IDENTITY_DB": identity_db,
            }
            services: list[tuple[str, str, dict[str, str], int]] = [
                ("audit", "audit", {
                    "MEDHIVE_AUDIT_DATABASE": f"bench{run_id}_audit",
                    "MEDHIVE_AUDIT_PORT": str(ports["audit"]),
                    **(audit_env or {}),
                }, ports["audit"]),
                ("scheduler", "scheduler", {
                    "MEDHIVE_SCHEDULER_DATABASE": f"bench{run_id}_scheduler",
                    "MEDHIVE_SCHEDULER_PORT": str(ports["scheduler"]),
                    "MEDHIVE_SCHEDULER_AUDIT_URL": f"http://127.0.0.1:{ports['audit']}",
                    "MEDHIVE_SCHEDULER_INSTANCE": "scheduler-1",
                    **(scheduler_env or {}),
                }, ports["scheduler"]),
            ]  # fmt: skip
            standbys = [
                (f"scheduler{i}", "scheduler", {
                    **services[1][2],
                    "MEDHIVE_SCHEDULER_INSTANCE": f"scheduler-{i}",
                    "MEDHIVE_SCHEDULER_PORT": str(free_port()),
                }, 0) for i in range(2, schedulers + 1)
            ]  # fmt: skip
            if netgw_env is not None:
                port = free_port()
                services.append(("netgw", "netgw", {
                    "MEDHIVE_NETGW_DATABASE": f"bench{run_id}_netgw",
                    "MEDHIVE_NETGW_PORT": str(port),
                    **netgw_env,
                }, port))  # fmt: skip
            for i, node_id in enumerate(node_ids):
                port = free_port()
                name = "vmnode" if nodes == 1 else f"vmnode{i + 1}"
                env = {"MEDHIVE_VMNODE_NODE_ID": node_id, "MEDHIVE_VMNODE_PORT": str(port)}
                services.append((name, "vmnode", {**env, **(node_env or {})}, port))
                # Runs after the agents have stopped (the exit stack unwinds backwards).
                cleanup.push_async_callback(_remove_containers, node_id)

            async with aiohttp.ClientSession() as session:
                for name, module, env, port in services:
                    argv = [sys.executable, "-m", f"services.{module}"]
                    process = start(name, argv, {**base, **env}, workdir / f"{name}.log")
                    stack.processes[name] = process
                    cleanup.push_async_callback(stop, process)
                    health = f"http://127.0.0.1:{port}/healthz"
                    await until_healthy(process, health, within=STARTUP_TIMEOUT_S)
                    progress(f"{name} healthy (pid {process.pid}, port {port})")
                for name, module, env, _ in standbys:
                    argv = [sys.executable, "-m", f"services.{module}"]
                    process = start(name, argv, {**base, **env}, workdir / f"{name}.log")
                    stack.processes[name] = process
                    cleanup.push_async_callback(stop, process)
                    progress(f"{name} started as a standby (pid {process.pid})")
                await _nodes_online(stack, session)
            progress(f"{nodes} node(s) online")
            yield stack
        except BaseException:
            if stack is not None:
                stack.dump_logs()
            raise
