"""DHCP bindings: dnsmasq, run by netgw, hands each leased MAC its IP and nothing else.

dnsmasq runs in `static` mode: only MACs listed in the hosts file get an address, so a
guest medhive did not lease gets none. A lease is bound by rewriting the hosts file
(atomically) and sending SIGHUP, which makes dnsmasq read it again.

netgw starts its own dnsmasq. A dnsmasq left by a netgw that was killed is found by
its pid file and replaced, so a restart never leaves two DHCP servers on one network.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

import structlog

from services.netgw.netns import Namespace
from services.netgw.settings import NetgwSettings

log = structlog.get_logger("medhive.netgw.dhcp")

#: How long a guest holds its DHCP lease before renewing (dnsmasq's lease time).
DHCP_LEASE = "10m"


class Dhcp:
    """dnsmasq for the guests' network, and the hosts file that binds MACs to IPs."""

    def __init__(self, settings: NetgwSettings, namespace: Namespace) -> None:
        self.settings = settings
        self.ns = namespace
        state = settings.state_dir
        self.hosts_file = state / "dhcp-hosts"
        self.lease_file = state / "dnsmasq.leases"
        self.pid_file = state / "dnsmasq.pid"
        self._process: asyncio.subprocess.Process | None = None

    def _argv(self) -> list[str]:
        s = self.settings
        network = s.guest_network.network
        return self.ns.command(
            s.dnsmasq,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",  # DHCP only, no DNS
            f"--interface={s.guest_interface}",
            "--bind-interfaces",
            "--except-interface=lo",
            f"--dhcp-range={network.network_address},static,{network.netmask},{DHCP_LEASE}",
            f"--dhcp-hostsfile={self.hosts_file}",
            f"--dhcp-leasefile={self.lease_file}",
            f"--pid-file={self.pid_file}",
            "--dhcp-authoritative",
            "--no-ping",  # the pool is ours: no 3 s ping before each answer
            "--log-facility=-",
        )

    async def start(self, bindings: Iterable[tuple[str, str]]) -> None:
        """Write the hosts file, replace any leftover dnsmasq, start ours."""
        # dnsmasq reads the hosts file after dropping to `nobody`.
        self.settings.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.bind(bindings, signal_dnsmasq=False)
        await self._kill_leftover()
        self._process = await asyncio.create_subprocess_exec(
            *self._argv(), stdin=asyncio.subprocess.DEVNULL
        )
        # dnsmasq writes its pid file once it is set up; until then a SIGHUP could kill it.
        for _ in range(200):
            if self._process.returncode is not None:
                raise RuntimeError(f"dnsmasq exited with {self._process.returncode}")
            if self._own_pid() is not None:
                break
            await asyncio.sleep(0.025)  # polling a file dnsmasq writes when ready
        log.info("dhcp_started", pid=self._own_pid(), interface=self.settings.guest_interface)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), 5)
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
        self._process = None

    def bind(self, bindings: Iterable[tuple[str, str]], signal_dnsmasq: bool = True) -> None:
        """Make (mac, ip) pairs the whole list of DHCP bindings.

        Written from the event loop: the file is a line per live lease, and writing it
        takes less time than handing the write to a thread would.
        """
        text = "".join(f"{mac},{ip}\n" for mac, ip in sorted(bindings))
        _write_atomically(self.hosts_file, text)
        pid = self._own_pid()
        if signal_dnsmasq and pid is not None:
            os.kill(pid, signal.SIGHUP)

    def _own_pid(self) -> int | None:
        """The pid of the dnsmasq this netgw runs, once it has written its pid file."""
        pid = _read_pid(self.pid_file)
        if pid is None or self._process is None or self._process.returncode is not None:
            return None
        return pid if _is_dnsmasq(pid) else None

    async def _kill_leftover(self) -> None:
        pid = _read_pid(self.pid_file)
        if pid is None or not _is_dnsmasq(pid):
            return
        log.info("dhcp_leftover_replaced", pid=pid)
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not _is_dnsmasq(pid):
                break
            await asyncio.sleep(0.025)  # waiting for the old process to exit
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_dnsmasq(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dnsmasq"
    except OSError:
        return False
