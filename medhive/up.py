"""`medhive up`: every service of one machine as child processes, logs interleaved.

Each line a service prints appears with its name in front. Ctrl-C (or SIGTERM) stops
them all gracefully, in reverse start order; if one dies, the others are stopped too.
When no MongoDB answers at `MEDHIVE_MONGO_URL` on this machine, a MongoDB-protocol
server (SecantusDB) is started on `--db-path`, so one command brings up a full stack.

Without a list of services it starts every one this machine can run, and says at start
which, and why the others were left out (`plan`): netgw when a VM network is configured
(`MEDHIVE_NETGW_*`) or the demo's exists (`medhive.localnet.DEMO`); the node agent runs
VMs too when libvirt answers. The datacache takes its sources from
`MEDHIVE_DATACACHE_SOURCES_FILE`, else from `sources.yaml` in the state directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import MutableMapping
from pathlib import Path

from yarl import URL

from medhive import localdb
from medhive.localnet import DEMO, VmNetwork
from medhive.processes import Child, answers, spawn, until_port

#: Every service, in start order (netgw before the node agents that ask it for leases).
SERVICES = ["scheduler", "audit", "datacache", "netgw", "vmnode"]
LIBVIRT_URI = "qemu:///system"

COLOURS = ["36", "35", "33", "32", "34", "31"]
#: Seconds the local database gets to answer; a service, to exit after SIGTERM.
DB_READY_WITHIN_S, STOP_WITHIN_S = 60.0, 20.0


def _mongo_address() -> tuple[str, int]:
    url = URL(os.environ.get("MEDHIVE_MONGO_URL", "mongodb://127.0.0.1:27017/"))
    return url.host or "127.0.0.1", url.port or 27017


async def _pump(name: str, colour: str, child: Child) -> None:
    prefix = f"\033[{colour}m{name:>9} |\033[0m " if sys.stdout.isatty() else f"{name:>9} | "
    stream = await child.output()
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


def _start(name: str, argv: list[str], colour: str) -> Child:
    """Start a child whose lines are printed with its name in front."""
    child = spawn(name, argv, env=os.environ)
    asyncio.get_running_loop().create_task(_pump(name, colour, child))
    return child


async def _database(db_path: str) -> list[str] | None:
    """The command that starts a local database, or None when one answers already."""
    host, port = _mongo_address()
    if await answers(host, port):
        return None
    if host not in ("127.0.0.1", "localhost") or not localdb.available():
        raise SystemExit(f"medhive up: no MongoDB answers at {host}:{port}")
    Path(db_path).mkdir(parents=True, exist_ok=True)
    return localdb.argv(host, port, db_path)


async def _service_credentials(services: list[str], state_dir: Path) -> None:
    """A master key for the datacache and a node token for the local node agent, made once
    and kept in `state_dir` (mode 0600), unless the environment already names them."""
    from services.datacache.crypto import LocalKeyProvider
    from shared.auth import Role, TokenStore
    from shared.mongo import connect
    from shared.settings import MongoSettings, default_host

    state_dir.mkdir(parents=True, exist_ok=True)
    if "datacache" in services and not (
        os.environ.get("MEDHIVE_DATACACHE_MASTER_KEY_FILE")
        or os.environ.get("MEDHIVE_DATACACHE_MASTER_KEY")
    ):
        key_file = state_dir / "master.key"
        if not key_file.exists():
            LocalKeyProvider.generate_key_file(key_file)
        os.environ["MEDHIVE_DATACACHE_MASTER_KEY_FILE"] = str(key_file)
    if "vmnode" in services and not os.environ.get("MEDHIVE_VMNODE_DATACACHE_TOKEN"):
        token_file = state_dir / "node.token"
        if not token_file.exists():
            node_id = os.environ.get("MEDHIVE_VMNODE_NODE_ID") or default_host()
            settings = MongoSettings()
            client = connect(settings)
            try:
                token = await TokenStore(client[settings.identity_db]).create(
                    node_id, "_nodes", Role.node
                )
            finally:
                await client.close()
            token_file.touch(mode=0o600)
            token_file.write_text(token)
        os.environ["MEDHIVE_VMNODE_DATACACHE_TOKEN"] = token_file.read_text().strip()


def _libvirt_refusal(uri: str) -> str | None:
    """Why libvirt does not answer at `uri`, or None when it does."""
    try:
        import libvirt
    except ImportError as exc:
        return f"libvirt-python is not installed ({exc})"
    libvirt.registerErrorHandler(lambda *_: None, None)  # its own stderr lines add nothing
    try:
        libvirt.open(uri).close()
    except libvirt.libvirtError as exc:
        return str(exc)
    return None


def plan(
    state_dir: Path, env: MutableMapping[str, str], demo: VmNetwork = DEMO
) -> tuple[dict[str, str], list[str]]:
    """The services this machine can run, each with what it was given; `env` gains the
    settings that follow from what was found. Returns (service -> what it runs, lines
    saying what was left out and why)."""
    started = {"scheduler": "the job API and the queue", "audit": "the audit trail"}
    left_out = []
    sources = state_dir / "sources.yaml"
    if "MEDHIVE_DATACACHE_SOURCES_FILE" not in env and sources.exists():
        env["MEDHIVE_DATACACHE_SOURCES_FILE"] = str(sources)
    named = env.get("MEDHIVE_DATACACHE_SOURCES_FILE", "nowhere (no sources file)")
    started["datacache"] = f"data sources from {named}"
    if any(key.startswith("MEDHIVE_NETGW_") for key in env):
        started["netgw"] = "the VM network that MEDHIVE_NETGW_* configures"
    elif demo.exists():
        for key, value in demo.netgw_env().items():
            env.setdefault(key, value)
        started["netgw"] = f"the demo's VM network (namespace {demo.gateway_ns})"
    else:
        left_out.append(
            "netgw: no VM network is configured (set MEDHIVE_NETGW_*, or run "
            "scripts/demo.sh, which makes a demo network)"
        )
    uri = env.get("MEDHIVE_VMNODE_LIBVIRT_URI", LIBVIRT_URI)
    if refusal := _libvirt_refusal(uri):
        env.pop("MEDHIVE_VMNODE_LIBVIRT_URI", None)
        started["vmnode"] = "containers"
        left_out.append(f"VM jobs: libvirt does not answer at {uri} ({refusal})")
    else:
        env["MEDHIVE_VMNODE_LIBVIRT_URI"] = uri
        if "MEDHIVE_VMNODE_VM_NETWORK" not in env and demo.exists():
            env["MEDHIVE_VMNODE_VM_NETWORK"] = demo.vm_network
        network = env.get("MEDHIVE_VMNODE_VM_NETWORK", "none, so no interactive ports")
        started["vmnode"] = f"containers, and VMs through {uri} (guests' network: {network})"
    return started, left_out


async def run_stack(services: list[str] | None, db_path: str, state_dir: Path | None = None) -> int:
    """Run `services` (None: every one this machine can run, see `plan`) until a signal
    or until one of them exits."""
    state_dir = state_dir or Path(db_path).parent
    if services is None:
        started, left_out = plan(state_dir, os.environ)
        services = [name for name in SERVICES if name in started]
        for name, what in started.items():
            print(f"medhive up: starting {name}: {what}", flush=True)
        for line in left_out:
            print(f"medhive up: left out {line}", flush=True)
    children: list[Child] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        db = await _database(db_path)
        if db is not None:
            children.append(_start("db", db, COLOURS[-1]))
            host, port = _mongo_address()
            await until_port(children[-1], port, host=host, within=DB_READY_WITHIN_S)
        await _service_credentials(services, state_dir)
        for i, name in enumerate(services):
            argv = [sys.executable, "-m", f"services.{name}"]
            children.append(_start(name, argv, COLOURS[i % len(COLOURS)]))
        waits = {asyncio.ensure_future(child.wait()): child.name for child in children}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        exited = [waits[t] for t in done if t in waits]
        if exited:
            print(f"medhive up: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
        stopper.cancel()
        return 1 if exited else 0
    finally:
        for child in reversed(children):
            await child.stop_async(STOP_WITHIN_S)
