"""VM jobs end to end: real libvirt and QEMU (software emulation), the tiny guest, netgw
with real dnsmasq and nftables in the test network's namespaces, every service a
process.

The guest is the kernel from Debian's cloud image with a busybox initramfs
(scripts/build-guest.sh); what it does comes from its kernel command line: take its
address by DHCP and serve a banner (`medhive.serve`), checksum its inputs onto the
writable disk (`medhive.checksum`), stay up (`medhive.sleep`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.e2e.support import (
    GUEST_DIR,
    URI,
    client,
    domains_of,
    origin_of,
    recorded,
    virsh,
    wait_state,
)
from tests.fixtures.vmnet import EXTERNAL_IP, VmNet
from tests.helpers import eventually
from tests.processes import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
async def vm_stack(
    stack: Stack, vmnet: VmNet, db_prefix: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """The stack with netgw on the test network and a node agent that runs VMs."""
    assert (GUEST_DIR / "vmlinuz").is_file(), "scripts/setup.sh builds the test guest"
    await stack.start(
        "netgw",
        **vmnet.netgw_env(),
        MEDHIVE_NETGW_DATABASE=f"{db_prefix}netgw",
        MEDHIVE_NETGW_PORT=str(free_port()),
    )
    stack.stop("vmnode")
    await stack.start(
        "vmnode",
        MEDHIVE_VMNODE_LIBVIRT_URI=URI,
        MEDHIVE_VMNODE_VM_DIR=str(tmp_path / "vms"),
        MEDHIVE_VMNODE_VM_NETWORK=f"direct:{vmnet.uplink}",
        MEDHIVE_VMNODE_VM_SHUTDOWN_GRACE_S="5",
    )
    try:
        yield stack
    finally:
        # netgw goes before its network does; the node agent leaves its domains behind.
        for name in ("netgw", "vmnode"):
            if name in stack.processes:
                stack.stop(name)
        for name in domains_of(stack.node_id):
            virsh("destroy", name)
            virsh("undefine", name)


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def vm_job(base: Path, cmdline: str, **fields: Any) -> dict[str, Any]:
    vm = {
        "kernel": str(GUEST_DIR / "vmlinuz"),
        "initrd": str(GUEST_DIR / "initrd.img"),
        "cmdline": cmdline,
        **fields.pop("vm", {}),
    }
    return {"kind": "vm", "name": "guest", "image": str(base), "walltime_s": 300,
            "resources": {"cpus": 1, "memory_mb": 256}, "vm": vm, **fields}  # fmt: skip


def serving_guest(base: Path, **fields: Any) -> dict[str, Any]:
    """A guest that stays up and answers on port 2222, which the job names `ssh`."""
    vm = {"interactive": [{"name": "ssh", "port": 2222}], **fields.pop("vm", {})}
    return vm_job(base, "medhive.serve=2222 medhive.sleep=inf", vm=vm, **fields)


async def test_a_user_reaches_the_guest_through_the_gateway_until_the_job_ends(
    vm_stack: Stack, vmnet: VmNet, user_token: str, base_image: Path, tmp_path: Path
) -> None:
    job = serving_guest(base_image)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(json.dumps(job))  # YAML reads JSON
    env = {**os.environ, "MEDHIVE_API_URL": vm_stack.api, "MEDHIVE_TOKEN": user_token,
           "MEDHIVE_AUDIT_URL": vm_stack.audit}  # fmt: skip
    follow = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "medhive", "submit", str(job_file), "--follow",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert follow.stdout is not None
    shown: list[str] = []
    async with asyncio.timeout(120):
        while not (shown and "connect to" in shown[-1]):
            line = await follow.stdout.readline()
            assert line, f"the job ended before its guest was ready: {shown}"
            shown.append(line.decode().rstrip())
    job_id = shown[0].split()[1]
    assert re.match(r"\d\d:\d\d:\d\d  running", shown[-2]), shown
    host, port = shown[-1].split("ssh: connect to ")[1].split(":")
    assert host == EXTERNAL_IP
    banner = await asyncio.to_thread(vmnet.connect, host, int(port))
    assert banner == b"medhive-guest ready\n"

    async with client(vm_stack, user_token) as api:
        job = await api.job(job_id)
        assert job["interactive"] == {"ssh": f"{host}:{port}"}  # as `medhive status` shows
        await api.cancel(job_id)
        rest, _ = await asyncio.wait_for(follow.communicate(), 120)
        assert "cancelled" in rest.decode()
        done = await wait_state(api, job_id, within=60)
        assert done["state"] == "cancelled"
        assert "interactive" not in done
        assert await asyncio.to_thread(vmnet.refuses, int(port))
        await eventually(vmnet.dhcp_hosts_empty, within=60)
        assert domains_of(vm_stack.node_id) == []
        assert list((tmp_path / "vms").iterdir()) == []

        # The release reaches the audit a moment after the port is closed.
        await recorded(api, {"job": job_id, "type": "net.released"}, lambda _: True)
        events, _ = await api.events({"job": job_id, "type": "net."})
        types = [e["type"] for e in events]
        for kind in ("net.lease", "net.leased", "net.forwarded", "net.released"):
            assert kind in types, types
        ready, _ = await api.events({"job": job_id, "type": "job.interactive_ready"})
        assert ready[0]["envelope"]["payload"]["endpoints"] == {"ssh": f"{host}:{port}"}


async def test_a_guest_reads_its_staged_input_from_the_iso_and_its_result_comes_back(
    vm_stack: Stack, user_token: str, base_image: Path, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    async with origin_of(vm_stack, {"ecg.bin": data}) as origin:
        job = vm_job(
            base_image,
            "medhive.checksum=1",
            inputs=[{"name": "ecg", "source": f"{origin.url}/ecg.bin", "path": "/data/ecg"}],
            outputs={"max_mb": 8},
            vm={"data_method": "iso", "disk_size_mb": 16, "filesystem": "ext4"},
        )
        async with client(vm_stack, user_token) as api:
            job_id = (await api.submit(job))["id"]
            done = await wait_state(api, job_id, within=180)
            assert done["state"] == "succeeded", done
            listing = await api.outputs(job_id)
            assert [f["path"] for f in listing["files"]] == ["checksums.sha256"]
            target = tmp_path / "checksums.sha256"
            await api.download(job_id, "checksums.sha256", target)
            digest = hashlib.sha256(data).hexdigest()
            assert target.read_text() == f"{digest}  data/ecg/ecg.bin\n"
            logs = await api.logs(job_id)
            assert "medhive-guest: up" in logs["stdout"]  # the serial console is the log
            assert re.search(rf"medhive-guest: sha256 {digest}", logs["stdout"])


async def test_walltime_shuts_the_guest_down_and_cleans_up(
    vm_stack: Stack, vmnet: VmNet, user_token: str, base_image: Path, tmp_path: Path
) -> None:
    job = serving_guest(
        base_image, walltime_s=25, vm={"data_method": "disk"}, outputs={"max_mb": 4}
    )
    async with client(vm_stack, user_token) as api:
        job_id = (await api.submit(job))["id"]
        done = await wait_state(api, job_id, within=120)
        assert done["state"] == "timed_out", (done.get("reason"), done.get("history"))
        assert domains_of(vm_stack.node_id) == []
        assert list((tmp_path / "vms").iterdir()) == []
        await eventually(vmnet.dhcp_hosts_empty, within=60)
        assert vmnet.forward_rules() == []


async def test_a_restarted_node_agent_finds_its_running_vm_and_reports_its_end(
    vm_stack: Stack, user_token: str, base_image: Path
) -> None:
    job = vm_job(base_image, "medhive.sleep=20")
    async with client(vm_stack, user_token) as api:
        job_id = (await api.submit(job))["id"]
        await wait_state(api, job_id, {"running"}, within=60)
        vm_stack.kill("vmnode")
        assert len(domains_of(vm_stack.node_id)) == 1  # the guest runs on without its agent
        await vm_stack.restart("vmnode")
        done = await wait_state(api, job_id, within=120)
        assert done["state"] == "succeeded", done
        assert domains_of(vm_stack.node_id) == []
        logs = await api.logs(job_id)
        assert "medhive-guest: done" in logs["stdout"]
