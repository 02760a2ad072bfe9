"""Child processes of a supervisor: `medhive up`, the benchmarks' stack (`bench.stack`)
and the tests' (`tests.processes`) start the services, the local database and the demo's
PACS through this module.

`spawn` starts a named child with its environment, its output appended to a log file
(or piped to the supervisor, which prints it: `Child.output`); `until_port` and
`until_healthy` wait until it is ready, and raise `ChildFailed`, with the end of its log,
if it exits first or takes too long; `Child.stop` sends SIGTERM, waits a bounded time,
then sends SIGKILL (`stop_async` in a coroutine); `Child.wait` awaits its exit.
A child is a `subprocess.Popen`, so that a synchronous caller (a test, the local PACS)
can stop it as well as an asynchronous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

#: Seconds a child gets to become ready (a port answers, a health route says ok).
READY_WITHIN_S = 60.0
#: How much of the end of a child's log an error quotes.
TAIL_CHARS = 20_000


class ChildFailed(RuntimeError):
    """A child exited, or was not ready in time; the message ends with its log's tail."""


def tail(log: Path, chars: int = TAIL_CHARS) -> str:
    """The last `chars` characters of a log file."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Child:
    """A child process started by `spawn`, and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    #: The file its output is appended to; None when it is piped to us (`output`).
    log: Path | None
    #: The reader of its piped output: held here, as the pipe's protocol holds it weakly.
    reader: asyncio.StreamReader | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """Its exit status if it has exited, else None."""
        return self.popen.poll()

    def tail(self, chars: int = TAIL_CHARS) -> str:
        return tail(self.log, chars) if self.log is not None else "(no log: it was piped)"

    def failure(self, what: str) -> ChildFailed:
        """An error saying `what` happened to it, with the end of its log."""
        if self.log is None:
            return ChildFailed(f"{self.name} {what} (its output was printed)")
        return ChildFailed(f"{self.name} {what}; the end of {self.log}:\n{self.tail()}")

    async def output(self) -> asyncio.StreamReader:
        """A reader of its output, when it was spawned without a log (read it to the end:
        a pipe that nobody reads stops the child once it is full)."""
        assert self.popen.stdout is not None, f"{self.name} writes to {self.log}"
        if self.reader is None:
            self.reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(self.reader)
            loop = asyncio.get_running_loop()
            await loop.connect_read_pipe(lambda: protocol, self.popen.stdout)
        return self.reader

    async def wait(self) -> int:
        """Its exit status, once it has exited; the loop runs on meanwhile (Linux says when
        through a pidfd, which becomes readable at the exit)."""
        if (status := self.popen.poll()) is not None:
            return status
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # reaped in between, by a `stop` in another thread
            return self.popen.wait()
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        try:
            loop.add_reader(pidfd, exited.set)
            await exited.wait()
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self.popen.wait()

    def stop(self, within: float) -> bool:
        """SIGTERM (the services shut down gracefully on it), then SIGKILL if it is still
        running `within` seconds later; returns whether it had to be killed."""
        if self.popen.poll() is not None:
            return False
        self.popen.terminate()
        try:
            self.popen.wait(within)
        except subprocess.TimeoutExpired:
            self.kill()
            return True
        return False

    async def stop_async(self, within: float) -> bool:
        """`stop`, without blocking the loop."""
        return await asyncio.to_thread(self.stop, within)

    def kill(self, within: float | None = None) -> None:
        """SIGKILL: no graceful shutdown, as when a host loses power; returns once it is
        gone (TimeoutExpired if that takes longer than `within` seconds)."""
        self.popen.kill()
        self.popen.wait(within)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
    stdin: int | None = None,
    new_session: bool = False,
) -> Child:
    """Start `argv` as child `name` with `env` (None: ours), its stdout and stderr appended
    to `log`, or piped to us when there is none (`Child.output`). `new_session`: in a
    session of its own, which a Ctrl-C or hang-up of our terminal does not reach (for a
    server meant to outlive us)."""
    with contextlib.ExitStack() as files:
        out: int | IO[bytes] = subprocess.PIPE
        if log is not None:
            out = files.enter_context(log.open("ab"))  # the child has its own descriptor
        popen = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )  # fmt: skip
    return Child(name, popen, log)


async def answers(host: str, port: int, within: float = 1.0) -> bool:
    """Whether something accepts TCP connections on `host:port`."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def until_ready(
    child: Child, ready: Callable[[], Awaitable[bool]], what: str, within: float
) -> None:
    """Ask `ready()` every 0.1 s until it says yes (the child gives no other sign);
    `ChildFailed` if the child exits first or `within` seconds pass. `what` names the
    state waited for, as in "<child> was not <what> after 60 s"."""
    try:
        async with asyncio.timeout(within):
            while (status := child.poll()) is None:
                if await ready():
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise child.failure(f"was not {what} after {within:.0f} s") from None
    raise child.failure(f"exited with status {status} before it was {what}")


async def until_port(
    child: Child, port: int, *, host: str = "127.0.0.1", within: float = READY_WITHIN_S
) -> None:
    """Wait until `child` accepts connections on `host:port` (a database's only sign)."""
    await until_ready(child, lambda: answers(host, port), f"answering on port {port}", within)


async def until_healthy(child: Child, url: str, *, within: float = READY_WITHIN_S) -> None:
    """Wait until a GET of `url`, the child's health route, answers 200."""
    async with aiohttp.ClientSession() as session:

        async def ok() -> bool:
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await until_ready(child, ok, f"healthy at {url}", within)
