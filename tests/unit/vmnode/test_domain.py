"""The domain XML of a VM attempt, and the record a restarted agent reads back."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.vmnode.domain import (
    Nic,
    VmLayout,
    domain_name,
    domain_xml,
    read_record,
    record_of,
)
from shared.messages.jobs import JobSpec, NodeRun

DEADLINE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def vm_run(**vm: object) -> NodeRun:
    spec = JobSpec.model_validate(
        {
            "kind": "vm",
            "name": "ecg",
            "image": "/images/ecg.qcow2",
            "resources": {"cpus": 1.5, "memory_mb": 512},
            "vm": vm,
        }
    )
    return NodeRun(job_id="job-1", attempt=2, tenant="cardio", spec=spec, deadline=DEADLINE)


def build(run: NodeRun, has_disk: bool, has_iso: bool, nic: Nic | None) -> ET.Element:
    record = record_of(run, "node-a", has_disk)
    layout = VmLayout(Path("/vms/x"))
    xml = domain_xml(run, record, layout, domain_type="qemu", has_iso=has_iso, nic=nic)
    assert read_record(xml) == record
    return ET.fromstring(xml)


def test_a_linux_guest_boots_its_kernel_with_virtio_disks_iso_and_leased_nic() -> None:
    run = vm_run(
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img",
        cmdline="medhive.serve=22",
        interactive=[{"name": "ssh", "port": 22}],
    )
    root = build(run, has_disk=True, has_iso=True, nic=Nic("02:6d:68:00:00:07", "direct:mhg0"))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == domain_name("job-1", 2) == "medhive-job-1-2"
    assert root.findtext("memory") == "512"
    assert root.findtext("vcpu") == "2"  # 1.5 cpus: a guest needs whole vCPUs
    assert root.findtext("os/kernel") == "/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/boot/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0 panic=-1 medhive.serve=22"
    assert root.findtext("on_poweroff") == "destroy"
    disks = root.findall("devices/disk")
    assert [(d.get("device"), d.find("target").get("dev"), d.find("target").get("bus"))  # type: ignore[union-attr]
            for d in disks] == [("disk", "vda", "virtio"), ("disk", "vdb", "virtio"),
                                ("cdrom", "hdc", "ide")]  # fmt: skip
    assert disks[0].find("source").get("file") == "/vms/x/root.qcow2"  # type: ignore[union-attr]
    assert disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks[2].find("readonly") is not None
    nic = root.find("devices/interface")
    assert nic is not None and nic.get("type") == "direct"
    assert nic.find("mac").get("address") == "02:6d:68:00:00:07"  # type: ignore[union-attr]
    assert nic.find("source").attrib == {"dev": "mhg0", "mode": "bridge"}  # type: ignore[union-attr]
    assert nic.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == "/vms/x/console.log"  # type: ignore[union-attr]


def test_a_windows_guest_gets_devices_it_has_drivers_for_and_no_nic_without_ports() -> None:
    root = build(vm_run(os="windows"), has_disk=False, has_iso=False, nic=None)
    assert root.find("os/kernel") is None
    assert root.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]
    disks = root.findall("devices/disk")
    assert [d.find("target").attrib for d in disks] == [{"dev": "sda", "bus": "sata"}]  # type: ignore[union-attr]
    assert root.find("devices/interface") is None
    nic_root = build(vm_run(os="windows"), False, False, Nic("02:6d:68:00:00:01", "bridge:br0"))
    nic = nic_root.find("devices/interface")
    assert nic is not None and nic.find("model").get("type") == "e1000e"  # type: ignore[union-attr]
    assert nic.find("source").attrib == {"bridge": "br0"}  # type: ignore[union-attr]


def test_the_record_carries_what_a_restarted_agent_needs() -> None:
    run = vm_run(filesystem="fat32", disk_size_mb=64, interactive=[{"name": "rdp", "port": 3389}])
    record = record_of(run, "node-a", has_disk=True)
    assert record.deadline_at == DEADLINE
    assert record.filesystem == "fat32"
    assert record.interactive == {"rdp": 3389}
    assert read_record("<domain><name>other</name></domain>") is None


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"command": ["x"]}, "apply to containers only"),
        ({"image": "busybox:1"}, "absolute path of a qcow2"),
        ({"vm": {"initrd": "/i"}}, "an initrd needs a kernel"),
        ({"vm": {"filesystem": "fat32", "disk_size_mb": 16}}, "at least 33 MiB"),
        ({"vm": {"interactive": [{"name": "a", "port": 1}, {"name": "a", "port": 2}]}}, "unique"),
        ({"kind": "container", "image": "busybox:1", "vm": {}}, "need `kind: vm`"),
    ],
)
def test_vm_job_descriptions_are_checked(fields: dict[str, object], complaint: str) -> None:
    body = {"kind": "vm", "name": "n", "image": "/images/a.qcow2", **fields}
    with pytest.raises(ValidationError, match=complaint):
        JobSpec.model_validate(body)
