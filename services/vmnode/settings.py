"""Settings of the node agent, read from `MEDHIVE_VMNODE_*` environment variables."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.settings import AmqpSettings, MongoSettings, default_host

#: Memory kept back for the host itself when the node's capacity is not configured.
HOST_RESERVE_MB = 512


def total_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """The host's total memory in MiB, from /proc/meminfo (sysconf where it is absent)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def _default_memory_mb() -> int:
    return max(total_memory_mb() - HOST_RESERVE_MB, 64)


def _default_domain_type() -> Literal["kvm", "qemu"]:
    """`kvm` where the CPU offers virtualisation and /dev/kvm exists, else `qemu`.

    /dev/kvm alone is not enough: some hosts have the device without the CPU flags,
    and a `kvm` domain there starts but never runs its guest.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "qemu"
    has_flags = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE) is not None
    return "kvm" if has_flags and os.path.exists("/dev/kvm") else "qemu"


def _default_cpus() -> float:
    return float(os.cpu_count() or 1)


class NodeSettings(BaseSettings):
    """Everything the node agent of one host needs to know."""

    model_config = SettingsConfigDict(env_prefix="MEDHIVE_VMNODE_", extra="ignore")

    amqp: AmqpSettings = Field(default_factory=AmqpSettings, description="RabbitMQ.")
    mongo: MongoSettings = Field(
        default_factory=MongoSettings,
        description="MongoDB; unused by the node agent (Docker labels are its record).",
    )
    trusted_users: list[str] | None = Field(
        None,
        description="AMQP users allowed to send node commands (default: the user of the AMQP URL, "
        "medhive's service account).",
    )
    node_id: str = Field(
        default_factory=default_host, min_length=1, max_length=128, description="Node name."
    )
    cpus: float = Field(
        default_factory=_default_cpus, gt=0, description="CPU cores this node offers to jobs."
    )
    memory_mb: int = Field(
        default_factory=_default_memory_mb,
        gt=0,
        description="Memory (MiB) this node offers to jobs; default: total minus 512.",
    )
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between heartbeats.")
    host: str = Field("127.0.0.1", description="Address of the health and metrics endpoints.")
    port: int = Field(8083, ge=0, le=65535, description="Port of the health and metrics endpoints.")
    runtime: Literal["docker", "instant", "swarm"] = Field(
        "docker",
        description="`docker` runs containers; `swarm` runs each as a Swarm job service "
        "(the engine must be a manager; on its own node unless `swarm_constraints` say "
        "otherwise); `instant` completes every job at once with exit 0 and never touches "
        "Docker (benchmarks only).",
    )
    swarm_constraints: list[str] = Field(
        default_factory=list,
        description="Swarm placement constraints of the nodes that run container jobs, e.g. "
        '`["node.labels.medhive==jobs"]`; Swarm picks one per attempt, and the job\'s data '
        "travels there through a stager task. Empty: every job runs on the agent's own node.",
    )
    swarm_stager_image: str = Field(
        "medhive/busybox:1",
        min_length=1,
        description="Image of the stager and uploader tasks on Swarm nodes (busybox: `sh`, "
        "`wget`, `sha256sum`, `find`, `od`); present on every node that runs jobs.",
    )
    swarm_datacache_url: str | None = Field(
        None,
        description="The datacache's API as tasks on Swarm nodes reach it; default: "
        "`datacache_url`.",
    )
    docker_url: str | None = Field(
        None, description="Docker daemon URL; default: aiodocker's (the local socket)."
    )
    stop_grace_s: float = Field(
        10.0, ge=0, description="Seconds between SIGTERM and SIGKILL when stopping a job."
    )
    log_limit_bytes: int = Field(
        256 * 1024, ge=1024, description="Output kept and reported per stream (the last bytes)."
    )
    datacache_url: str = Field(
        "http://127.0.0.1:8082", description="The datacache's API, where jobs' data comes from."
    )
    datacache_token: SecretStr | None = Field(
        None, description="This node's token for the datacache (role `node`, named after it)."
    )
    work_dir: Path = Field(
        Path("/var/lib/medhive/jobs"), description="Private per-job directories of inputs."
    )
    tmpfs_inputs_mb: int = Field(
        2048, ge=0, description="Inputs up to this size are kept in memory (tmpfs), not on disk."
    )
    libvirt_uri: str | None = Field(
        None,
        description="libvirt connection for VM jobs, e.g. `qemu:///system`; unset: this "
        "node runs no VMs.",
    )
    vm_domain_type: Literal["kvm", "qemu", "test"] = Field(
        default_factory=_default_domain_type,
        description="libvirt domain type: `kvm` where the CPU and /dev/kvm allow it, else `qemu` "
        "(software emulation); `test` for libvirt's test driver.",
    )
    vm_dir: Path = Field(
        Path("/var/lib/medhive/vms"), description="Per-attempt overlays, data disks, consoles."
    )
    vm_network: str | None = Field(
        None,
        pattern=r"^(bridge|direct):[\w.-]{1,15}$",
        description="Where guests' NICs attach: `bridge:NAME` (a Linux bridge) or "
        "`direct:DEVICE` (macvtap on a device); needed for interactive ports.",
    )
    vm_shutdown_grace_s: float = Field(
        60.0, ge=0, description="Seconds a guest gets to power off (ACPI) before it is destroyed."
    )
    workload_user: str = Field(
        "65534:65534", min_length=1, description="uid:gid workloads run as (never root)."
    )

    @property
    def workload_ids(self) -> tuple[int, int]:
        """The numeric uid and gid workloads run as (owners of their job directory)."""
        uid, _, gid = self.workload_user.partition(":")
        return int(uid), int(gid or uid)

    @field_validator("workload_user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value.split(":", 1)[0] in {"0", "root"}:
            raise ValueError("workloads never run as root")
        if not all(part.isdigit() for part in value.split(":", 1)):
            raise ValueError("give numeric uid:gid")
        return value
