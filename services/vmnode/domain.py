"""The libvirt domain of a VM attempt: its XML, and the record it carries of the job.

The domain is the node's durable record of a VM attempt, as labels are for a
container: `<metadata>` holds the job, attempt, tenant, deadline, node, interactive
ports and disk layout, so a restarted agent can find its domains and finish them.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from shared.messages.jobs import NodeRun

#: The XML namespace of medhive's domain metadata.
METADATA_NS = "urn:medhive:vm:1"
PREFIX = "medhive-"
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def domain_name(job_id: str, attempt: int) -> str:
    return f"{PREFIX}{_UNSAFE.sub('-', job_id)[:64]}-{attempt}"


@dataclass(frozen=True)
class VmRecord:
    """What a domain records about its attempt (JSON in the domain's metadata)."""

    job_id: str
    attempt: int
    tenant: str
    deadline: str
    node_id: str
    filesystem: str | None  # of the writable disk; None: the job has none
    interactive: dict[str, int] = field(default_factory=dict)  # port name -> guest port

    @property
    def deadline_at(self) -> datetime:
        return datetime.fromisoformat(self.deadline)


@dataclass(frozen=True)
class VmLayout:
    """Where an attempt's files are on the node."""

    directory: Path

    @property
    def overlay(self) -> Path:
        return self.directory / "root.qcow2"

    @property
    def iso(self) -> Path:
        return self.directory / "data.iso"

    @property
    def disk(self) -> Path:
        return self.directory / "data.img"

    @property
    def console(self) -> Path:
        return self.directory / "console.log"


@dataclass(frozen=True)
class Nic:
    """The guest's network card: the leased MAC on the node's bridge or macvtap parent."""

    mac: str
    network: str  # `bridge:NAME` or `direct:DEVICE`


def record_of(run: NodeRun, node_id: str, has_disk: bool) -> VmRecord:
    vm = run.spec.vm
    assert vm is not None
    return VmRecord(
        job_id=run.job_id,
        attempt=run.attempt,
        tenant=run.tenant,
        deadline=run.deadline.isoformat(),
        node_id=node_id,
        filesystem=vm.filesystem if has_disk else None,
        interactive={port.name: port.port for port in vm.interactive},
    )


def domain_xml(
    run: NodeRun,
    record: VmRecord,
    layout: VmLayout,
    *,
    domain_type: str,
    has_iso: bool,
    nic: Nic | None,
) -> str:
    """The domain of one attempt. Linux guests get virtio devices; Windows guests, which
    have no virtio drivers out of the box, get SATA disks and an e1000e card."""
    spec, vm = run.spec, run.spec.vm
    assert vm is not None
    windows = vm.os == "windows"
    bus, disk_prefix = ("sata", "sd") if windows else ("virtio", "vd")
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = domain_name(run.job_id, run.attempt)
    ET.SubElement(root, "title").text = f"medhive job {run.job_id} attempt {run.attempt}"
    metadata = ET.SubElement(root, "metadata")
    ET.SubElement(metadata, f"{{{METADATA_NS}}}run").text = json.dumps(asdict(record))
    ET.SubElement(root, "memory", unit="MiB").text = str(spec.resources.memory_mb)
    ET.SubElement(root, "vcpu").text = str(max(1, math.ceil(spec.resources.cpus)))
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if vm.kernel is not None:
        ET.SubElement(os_, "kernel").text = vm.kernel
        if vm.initrd is not None:
            ET.SubElement(os_, "initrd").text = vm.initrd
        ET.SubElement(os_, "cmdline").text = " ".join(
            ["console=ttyS0", "panic=-1", *([vm.cmdline] if vm.cmdline else [])]
        )
    else:
        ET.SubElement(os_, "boot", dev="hd")
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    # A guest that powers off, reboots or crashes has ended: the domain stops and stays
    # defined, so the agent can read how it ended and collect the disk.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, event).text = "destroy"
    devices = ET.SubElement(root, "devices")
    _disk(devices, "qcow2", layout.overlay, f"{disk_prefix}a", bus)
    if record.filesystem is not None:
        _disk(devices, "raw", layout.disk, f"{disk_prefix}b", bus)
    if has_iso:
        cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "driver", name="qemu", type="raw")
        ET.SubElement(cdrom, "source", file=str(layout.iso))
        ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
        ET.SubElement(cdrom, "readonly")
    if nic is not None:
        kind, _, device = nic.network.partition(":")
        interface = ET.SubElement(devices, "interface", type=kind)
        if kind == "bridge":
            ET.SubElement(interface, "source", bridge=device)
        else:
            ET.SubElement(interface, "source", dev=device, mode="bridge")
        ET.SubElement(interface, "mac", address=nic.mac)
        ET.SubElement(interface, "model", type="e1000e" if windows else "virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(layout.console))
    ET.SubElement(serial, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    ET.register_namespace("medhive", METADATA_NS)
    return ET.tostring(root, encoding="unicode")


def _disk(devices: ET.Element, fmt: str, path: Path, target: str, bus: str) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type=fmt)
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev=target, bus=bus)


def read_record(xml: str) -> VmRecord | None:
    """The medhive record in a domain's XML; None for a domain medhive did not make."""
    node = ET.fromstring(xml).find(f"metadata/{{{METADATA_NS}}}run")
    if node is None or not node.text:
        return None
    try:
        return VmRecord(**json.loads(node.text))
    except (TypeError, ValueError):
        return None
