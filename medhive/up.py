"""`medhive up`: every service of one machine as child processes, logs interleaved.

Each line a service prints appears with its name in front. Ctrl-C (or SIGTERM) stops
them all gracefully, in reverse start order; if one dies, the others are stopped too.
When no MongoDB answers at `MEDHIVE_MONGO_URL` on this machine, a MongoDB-protocol
server (SecantusDB) is started on `--db-path`, so one command brings up a full stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from yarl import URL

from medhive import localdb

COLOURS = ["36", "35", "33", "32", "34", "31"]


async def _answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def _pump(name: str, colour: str, stream: asyncio.StreamReader) -> None:
    prefix = f"\033[{colour}m{name:>9} |\033[0m " if sys.stdout.isatty() else f"{name:>9} | "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


async def _start(name: str, argv: list[str], colour: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=os.environ
    )
    assert process.stdout is not None
    asyncio.get_running_loop().create_task(_pump(name, colour, process.stdout))
    return process


async def _database(db_path: str) -> list[str] | None:
    """The command that starts a local database, or None when one answers already."""
    url = URL(os.environ.get("MEDHIVE_MONGO_URL", "mongodb://127.0.0.1:27017/"))
    host, port = url.host or "127.0.0.1", url.port or 27017
    if await _answers(host, port):
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


async def run_stack(services: list[str], db_path: str, state_dir: Path | None = None) -> int:
    processes: list[tuple[str, asyncio.subprocess.Process]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        db = await _database(db_path)
        if db is not None:
            processes.append(("db", await _start("db", db, COLOURS[-1])))
            url = URL(os.environ.get("MEDHIVE_MONGO_URL", "mongodb://127.0.0.1:27017/"))
            async with asyncio.timeout(60):
                while not await _answers(url.host or "127.0.0.1", url.port or 27017):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # the server gives no other sign of readiness
        await _service_credentials(services, state_dir or Path(db_path).parent)
        for i, name in enumerate(services):
            argv = [sys.executable, "-m", f"services.{name}"]
            processes.append((name, await _start(name, argv, COLOURS[i % len(COLOURS)])))
        waits = {asyncio.ensure_future(p.wait()): n for n, p in processes}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        exited = [waits[t] for t in done if t in waits]
        if exited:
            print(f"medhive up: {', '.join(exited)} exited; stopping the rest", file=sys.stderr)
        stopper.cancel()
        return 1 if exited else 0
    finally:
        for _, process in reversed(processes):
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 20)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
