"""`medhive up` starts every service this machine can run, and says why it left any out:
decided against a real libvirt (its test driver, and a socket nobody listens on) and
real network namespaces."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from medhive.localnet import VmNetwork
from medhive.up import SERVICES, plan


@pytest.fixture
def network(tmp_path: Path) -> Iterator[VmNetwork]:
    """A VM network like the demo's, under fresh names (not created)."""
    tag = uuid.uuid4().hex[:6]
    net = VmNetwork(f"mhgw-{tag}", f"mhcl-{tag}", f"mhg-{tag}", tmp_path / "netgw")
    try:
        yield net
    finally:
        net.remove()


NO_LIBVIRT = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def test_without_a_vm_network_or_libvirt_only_containers_are_offered(
    network: VmNetwork, tmp_path: Path
) -> None:
    env = {"MEDHIVE_VMNODE_LIBVIRT_URI": NO_LIBVIRT}
    started, left_out = plan(tmp_path, env, demo=network)
    assert [name for name in SERVICES if name in started] == [
        "scheduler", "audit", "datacache", "vmnode"
    ]  # fmt: skip
    assert started["vmnode"] == "containers"
    assert "MEDHIVE_VMNODE_LIBVIRT_URI" not in env  # the agent is not told to run VMs
    assert left_out[0].startswith("netgw: no VM network is configured")
    assert left_out[1].startswith(f"VM jobs: libvirt does not answer at {NO_LIBVIRT}")


def test_the_demo_network_brings_netgw_and_the_guests_link(
    network: VmNetwork, tmp_path: Path
) -> None:
    network.create()
    (tmp_path / "sources.yaml").write_text("sources: []\n")
    env = {"MEDHIVE_VMNODE_LIBVIRT_URI": "test:///default"}
    started, left_out = plan(tmp_path, env, demo=network)
    assert left_out == []
    assert "netgw" in started and "VMs through test:///default" in started["vmnode"]
    assert env["MEDHIVE_NETGW_NETNS"] == network.gateway_ns
    assert env["MEDHIVE_VMNODE_VM_NETWORK"] == f"direct:{network.uplink}"
    assert env["MEDHIVE_DATACACHE_SOURCES_FILE"] == str(tmp_path / "sources.yaml")


def test_settings_given_by_the_operator_win(network: VmNetwork, tmp_path: Path) -> None:
    network.create()
    (tmp_path / "sources.yaml").write_text("sources: []\n")
    env = {
        "MEDHIVE_VMNODE_LIBVIRT_URI": "test:///default",
        "MEDHIVE_NETGW_NETNS": "hospital-gw",
        "MEDHIVE_VMNODE_VM_NETWORK": "bridge:br0",
        "MEDHIVE_DATACACHE_SOURCES_FILE": "/etc/medhive/sources.yaml",
    }
    started, _ = plan(tmp_path, env, demo=network)
    assert started["netgw"] == "the VM network that MEDHIVE_NETGW_* configures"
    assert env["MEDHIVE_NETGW_NETNS"] == "hospital-gw"
    assert env["MEDHIVE_VMNODE_VM_NETWORK"] == "bridge:br0"
    assert env["MEDHIVE_DATACACHE_SOURCES_FILE"] == "/etc/medhive/sources.yaml"
