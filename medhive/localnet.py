"""A network for VM jobs on one machine, built from network namespaces: the gateway that
netgw manages, a client outside it, and the link the guests attach to.

    client ns            gateway ns (netgw's dnsmasq and nftables)        root ns
    ext1 10.78.0.2 ---- ext0 10.78.0.1 (external)
                        medhive0 10.77.0.1/24 (guests) ------------------- uplink
                                                                    (macvtap parent)

A guest's NIC is a macvtap on `uplink` (the node agent's `direct:` network); netgw
leases its MAC and address and forwards ports of the external address to it; a user in
the client namespace connects to those ports as a user outside the hospital's server
network would. Nothing touches the host's own network beyond the one veth end `uplink`,
which has no address: the host's routes and firewall stay as they were.

Two lifetimes: the demo's network (`DEMO`, fixed names, kept until the machine
restarts, found by `medhive up`), and the tests' (fresh names, removed afterwards).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

GATEWAY_IP, GUEST_PREFIX = "10.77.0.1", 24
IP_RANGE = ("10.77.0.100", "10.77.0.199")
EXTERNAL_IP, CLIENT_IP = "10.78.0.1", "10.78.0.2"
GUEST_INTERFACE = "medhive0"


def sh(*argv: str, netns: str | None = None) -> str:
    """Run a command (inside `netns` if given); its output, or RuntimeError with stderr."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def present(namespaces: set[str], link: str) -> bool:
    """Whether these network namespaces and this root-namespace link all exist."""
    listed = set(sh("ip", "netns", "list").split())
    found = subprocess.run(["ip", "link", "show", link], capture_output=True)
    return namespaces <= listed and found.returncode == 0


@dataclass(frozen=True)
class VmNetwork:
    gateway_ns: str
    client_ns: str
    uplink: str  # the root-namespace end of the guests' link (macvtap parent)
    #: netgw's state (dnsmasq's hosts file): dnsmasq reads it after dropping to `nobody`,
    #: so not under a private directory
    state_dir: Path

    def exists(self) -> bool:
        return present({self.gateway_ns, self.client_ns}, self.uplink)

    def create(self) -> None:
        for ns in (self.gateway_ns, self.client_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", netns=ns)
        gw = self.gateway_ns
        sh("ip", "link", "add", self.uplink, "type", "veth", "peer", "name", GUEST_INTERFACE,
           "netns", gw)  # fmt: skip
        sh("ip", "link", "set", self.uplink, "up")
        sh("ip", "addr", "add", f"{GATEWAY_IP}/{GUEST_PREFIX}", "dev", GUEST_INTERFACE, netns=gw)
        sh("ip", "link", "set", GUEST_INTERFACE, "up", netns=gw)
        sh("ip", "link", "add", "ext0", "netns", gw, "type", "veth", "peer", "name", "ext1",
           "netns", self.client_ns)  # fmt: skip
        sh("ip", "addr", "add", f"{EXTERNAL_IP}/24", "dev", "ext0", netns=gw)
        sh("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "ext1", netns=self.client_ns)
        sh("ip", "link", "set", "ext0", "up", netns=gw)
        sh("ip", "link", "set", "ext1", "up", netns=self.client_ns)
        sh("sysctl", "-q", "-w", "net.ipv4.ip_forward=1", netns=gw)

    def ensure(self) -> None:
        """Create the network unless it is whole (a half-made one is made again)."""
        if not self.exists():
            self.remove()
            self.create()

    def remove(self) -> None:
        """The link, the namespaces, and whatever still runs in them (a dnsmasq of a
        killed netgw); what is already gone is skipped."""
        with contextlib.suppress(RuntimeError):
            sh("ip", "link", "del", self.uplink)
        for ns in (self.gateway_ns, self.client_ns):
            with contextlib.suppress(RuntimeError):
                for pid in sh("ip", "netns", "pids", ns).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
            with contextlib.suppress(RuntimeError):
                sh("ip", "netns", "del", ns)

    def netgw_env(self) -> dict[str, str]:
        """netgw's settings for this network."""
        return {
            "MEDHIVE_NETGW_NETNS": self.gateway_ns,
            "MEDHIVE_NETGW_GUEST_INTERFACE": GUEST_INTERFACE,
            "MEDHIVE_NETGW_GUEST_NETWORK": f"{GATEWAY_IP}/{GUEST_PREFIX}",
            "MEDHIVE_NETGW_IP_RANGE": f'["{IP_RANGE[0]}", "{IP_RANGE[1]}"]',
            "MEDHIVE_NETGW_EXTERNAL_ADDRESS": EXTERNAL_IP,
            "MEDHIVE_NETGW_STATE_DIR": str(self.state_dir),
        }

    @property
    def vm_network(self) -> str:
        """The node agent's `MEDHIVE_VMNODE_VM_NETWORK` for guests on this network."""
        return f"direct:{self.uplink}"


DEMO = VmNetwork("medhive-gw", "medhive-client", "mhguests0", Path("/run/medhive-netgw"))
