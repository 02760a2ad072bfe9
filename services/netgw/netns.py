"""Running the gateway's work inside its network namespace.

netgw may run in one namespace (where it reaches RabbitMQ and MongoDB) and manage
another (where the guests' network and the external interface are). Entering a
namespace with setns(2) changes only the calling thread, so netgw keeps two thread
pools that enter it once, at their start: one thread for nftables (so rule changes are
applied one at a time, in order) and a few for reachability probes (a probe may wait
on a booting guest). Child processes (dnsmasq, conntrack) start through
`ip netns exec`.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PROBE_THREADS = 8


def _enter(name: str | None) -> None:
    """Move the calling thread into network namespace `name` (None: stay)."""
    if name is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Namespace:
    """The gateway's network namespace: where its rules, probes and daemons act."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        if name is not None and not os.path.exists(f"/run/netns/{name}"):
            raise FileNotFoundError(f"network namespace {name} does not exist")
        self._serial = ThreadPoolExecutor(1, "netgw-nft", _enter, (name,))
        self._probes = ThreadPoolExecutor(PROBE_THREADS, "netgw-probe", _enter, (name,))

    async def serial(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` in the namespace, after every earlier `serial` call has finished."""
        return await asyncio.get_running_loop().run_in_executor(self._serial, fn, *args)

    async def reachable(self, ip: str, port: int, timeout_s: float) -> bool:
        """Whether a TCP connection to ip:port opens from the gateway within `timeout_s`."""
        return await asyncio.get_running_loop().run_in_executor(
            self._probes, _connects, ip, port, timeout_s
        )

    def command(self, *argv: str) -> list[str]:
        """`argv` as a command that runs in the namespace."""
        return ["ip", "netns", "exec", self.name, *argv] if self.name else list(argv)

    def close(self) -> None:
        self._serial.shutdown(wait=False, cancel_futures=True)
        self._probes.shutdown(wait=False, cancel_futures=True)


def _connects(ip: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True
    except OSError:
        return False
