"""What a container job becomes in Docker Swarm: one service spec and one network spec.

`service_spec` is the Swarm counterpart of `docker.container_config`, and the one place
that decides how a Swarm workload is confined. Where the Swarm API (1.41, Docker 20.10)
cannot say what the local runtime says, the gap is named here:

- `NetworkMode: none` does not exist for services ("network none not found"), and a
  service without networks lands on the default bridge, with full network access. Each
  job gets its own *internal* overlay network instead: the task sees `lo` and one
  interface on a network that has no gateway, no route out and nobody else on it (the
  host's addresses are unreachable from it, measured; a shared internal bridge would
  let the task reach the host on the bridge's address).
- There is no `no-new-privileges` in a 1.41 `ContainerSpec`: no capabilities, a non-root
  user and a read-only root remain; a setuid binary in the image could still take uid 0
  (without any capability). Sites set `"no-new-privileges": true` in daemon.json.
- There is no swap limit: Docker gives the task memory+swap twice its memory where the
  host has swap (these hosts have none).
- The pids limit (`Resources.Limits.Pids`) is honoured by 20.10 (measured: pids.max).
- No `Resources.Reservations`, although the API takes them: Swarm's constraint enforcer
  keeps counting the reservations of *finished* job tasks (their desired state stays
  `complete`, even after their service is removed), so after a few jobs every new task
  is rejected with "assigned node no longer meets constraints" (measured here; moby
  issue 52652, fixed in swarmkit PR 3237 in 2026, not in 20.10). The enforcer skips a
  task without reservations; reserving capacity is medhive's placement's job anyway
  (the scheduler reserves each job's `resources` on the node), and the limits hold.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from services.vmnode.runtimes.base import Mount, State
from services.vmnode.runtimes.docker import MIB, labels, log_max_size
from services.vmnode.settings import NodeSettings
from shared.messages.jobs import NodeRun

#: Scratch space. Swarm mounts a tmpfs with rw,nosuid,nodev,noexec (measured); 1.41 has
#: no field for other options.
TMP_BYTES = 64 * MIB
#: The label holding the image's name: the spec names the image by its id (see below).
IMAGE_LABEL = "medhive.image"
_UNSAFE = re.compile(r"[^a-zA-Z0-9-]+")

#: Task states (swarmkit's order) as the agent's workload states.
_BEFORE_RUNNING = ("new", "pending", "assigned", "accepted", "preparing", "ready", "starting")
ENDED = ("complete", "failed", "shutdown", "rejected", "orphaned", "remove")
#: Ended without the workload's process ever running.
NEVER_RAN = ("rejected", "orphaned")


#: Scratch space: a tmpfs of the task's own.
TMP_MOUNT = {
    "Type": "tmpfs",
    "Target": "/tmp",
    "TmpfsOptions": {"SizeBytes": TMP_BYTES, "Mode": 0o1777},
}


def bind_mount(mount: Mount) -> dict[str, Any]:
    """One of the job's host directories, with private propagation: nothing mounted
    later leaks in."""
    return {
        "Type": "bind",
        "Source": str(mount.source),
        "Target": mount.target,
        "ReadOnly": mount.read_only,
        "BindOptions": {"Propagation": "rprivate"},
    }


def service_name(node_id: str, job_id: str, attempt: int) -> str:
    """A unique, valid service name (a DNS label: letters, digits, '-', at most 63)."""
    digest = hashlib.sha256(f"{node_id}\0{job_id}\0{attempt}".encode()).hexdigest()[:16]
    return f"medhive-{_UNSAFE.sub('-', job_id)[:24].strip('-')}-{attempt}-{digest}"


def workload_state(task: Mapping[str, Any] | None) -> State:
    """The agent's view of a task: not yet running, running, or ended."""
    if task is None:
        return "created"  # the service exists; Swarm has not made its task yet
    state = task["Status"]["State"]
    if state in _BEFORE_RUNNING:
        return "created"
    if state == "running":
        return "running"
    return "exited" if state in ENDED else "other"


def network_spec(name: str, run: NodeRun, node_id: str) -> dict[str, Any]:
    """The job's own network: overlay, internal (no gateway), not attachable."""
    return {
        "Name": name,
        "Driver": "overlay",
        "Internal": True,
        "Attachable": False,
        "CheckDuplicate": True,
        "Labels": labels(run, node_id),
    }


def service_spec(
    run: NodeRun,
    settings: NodeSettings,
    *,
    name: str,
    image_id: str,
    network_id: str,
    swarm_node: str,
    mounts: Sequence[Mount] = (),
) -> dict[str, Any]:
    """The create body of the service that runs `run`: one task, never restarted,
    pinned to `swarm_node`, inside medhive's confinement.

    The image is named by its id, which the engine runs without asking a registry
    (by name, every task start tries a pull first); medhive never pulls.
    """
    spec = run.spec
    memory = spec.resources.memory_mb * MIB
    nano_cpus = int(spec.resources.cpus * 1e9)
    own = labels(run, settings.node_id)
    container: dict[str, Any] = {
        "Image": image_id,
        "Labels": {**own, IMAGE_LABEL: spec.image},
        "Env": [f"{key}={value}" for key, value in spec.env.items()],
        "User": settings.workload_user,
        "ReadOnly": True,
        "CapabilityDrop": ["ALL"],
        # tini as PID 1: SIGTERM reaches the workload and zombies are reaped.
        "Init": True,
        "TTY": False,
        "OpenStdin": False,
        "StopGracePeriod": math.ceil(settings.stop_grace_s) * 1_000_000_000,
        "Mounts": [TMP_MOUNT, *(bind_mount(m) for m in mounts)],
    }
    if spec.command is not None:
        container["Args"] = list(spec.command)  # Docker's Cmd: the image's entrypoint stays
    if spec.workdir is not None:
        container["Dir"] = spec.workdir
    return {
        "Name": name,
        "Labels": {**own, IMAGE_LABEL: spec.image},
        "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
        "TaskTemplate": {
            "ContainerSpec": container,
            "Resources": {
                "Limits": {
                    "NanoCPUs": nano_cpus,
                    "MemoryBytes": memory,
                    "Pids": spec.resources.pids,
                },
            },
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": [f"node.id=={swarm_node}"]},
            "Networks": [{"Target": network_id}],
            "LogDriver": {
                "Name": "json-file",
                "Options": {"max-size": log_max_size(settings.log_limit_bytes), "max-file": "2"},
            },
        },
    }
