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

One module because the workload's, the helpers' and the retirement's specs must confine
alike (no capabilities, a read-only root, the workload's uid) and carry
the names and labels (`service_name`, `part_name`, `PART_LABEL`, `RETIRED_LABEL`) that
swarm.py finds its objects by, so a change to one spec is seen beside the others.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
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

#: Marks a service as one of an attempt's helpers (`stager`, `uploader`), not its workload.
PART_LABEL = "medhive.part"
#: On a workload service whose results an uploader stores: the /outputs bound in MiB.
OUTPUTS_LABEL = "medhive.outputs_mb"
#: On the task that retires a job service (`retired_spec`): not the job's own task.
RETIRED_LABEL = "medhive.retired"
#: The name under /run/secrets of the attempt's delegated datacache token.
TOKEN_FILE = "medhive-token"
#: How often Docker probes whether the stager has placed every input.
PROBE_NS = 200_000_000

#: The stager: fetch each (sha256, path) pair of its arguments from the datacache under
#: the delegated token and check it, make the inputs read-only, say so (its health
#: check), then hold the inputs' tmpfs volumes until it is retired or the deadline.
STAGE_SCRIPT = r"""set -eu
auth="Authorization: Bearer $(cat /run/secrets/medhive-token)"
while [ $# -ge 2 ]; do
  mkdir -p "$(dirname "$2")"
  wget -q -O "$2" --header "$auth" "$MEDHIVE_DATACACHE/v1/jobs/$MEDHIVE_JOB/objects/$1"
  sum=$(sha256sum "$2")
  if [ "${sum%% *}" != "$1" ]; then echo "input $2 arrived with the wrong SHA-256" >&2; exit 65; fi
  shift 2
done
for input in /in/*; do [ -e "$input" ] && chmod -R a-w "$input"; done
touch /tmp/ready
left=$((MEDHIVE_UNTIL - $(date +%s)))
if [ "$left" -gt 0 ]; then exec sleep "$left"; fi
"""
#: The uploader: every regular file under /out (never a symlink) stored in the
#: datacache under the delegated token; each answer (JSON) on a line of its own.
UPLOAD_SCRIPT = r"""set -eu
auth="Authorization: Bearer $(cat /run/secrets/medhive-token)"
cd /out
find . -type f | while IFS= read -r file; do
  path=$(printf %s "${file#./}" | od -An -v -tx1 | tr -d ' \n' | sed 's/../%&/g; s|%2f|/|g')
  wget -q -O - --header "$auth" --post-file "$file" \
    "$MEDHIVE_DATACACHE/v1/jobs/$MEDHIVE_JOB/outputs/$path"
  echo
done
"""

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


def is_retirement(task: Mapping[str, Any]) -> bool:
    """Whether `task` is the `true` of `retired_spec`, not the job's own task."""
    return RETIRED_LABEL in (task["Spec"]["ContainerSpec"].get("Labels") or {})


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


def network_spec(name: str, run: NodeRun, node_id: str, internal: bool = True) -> dict[str, Any]:
    """The job's own network: overlay, internal (no gateway), not attachable. A
    stager's is not internal: it reaches the datacache."""
    return {
        "Name": name,
        "Driver": "overlay",
        "Internal": internal,
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
    constraints: Sequence[str],
    mounts: Sequence[Mount] = (),
    volumes: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The create body of the service that runs `run`: one task, never restarted,
    placed by `constraints` (a node id, here), inside medhive's confinement; its data
    are host directories (`mounts`) or tmpfs volumes a stager filled (`volumes`).

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
        "Mounts": [TMP_MOUNT, *(bind_mount(m) for m in mounts), *volumes],
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
            "Placement": {"Constraints": list(constraints)},
            "Networks": [{"Target": network_id}],
            "LogDriver": {
                "Name": "json-file",
                "Options": {"max-size": log_max_size(settings.log_limit_bytes), "max-file": "2"},
            },
        },
    }


# -- an attempt on another Swarm node: its data through a stager and an uploader -------


def part_name(name: str, part: str) -> str:
    """The name of an attempt's helper service (or its network): `<name>-<part>`."""
    return f"{name}-{part}"


def tmpfs_volume(
    source: str, target: str, size: int, settings: NodeSettings, *, read_only: bool
) -> dict[str, Any]:
    """A local volume of type tmpfs on the task's node, owned by the workload's uid.

    Its content lives as long as one container mounts it: the stager holds the inputs'
    (and the results') for the whole attempt, so the data stay in that node's memory
    and nowhere else."""
    uid, gid = settings.workload_ids
    options = f"size={max(size, MIB)},uid={uid},gid={gid},mode=0700,nosuid,nodev,noexec"
    return {
        "Type": "volume",
        "Source": source,
        "Target": target,
        "ReadOnly": read_only,
        "VolumeOptions": {
            "NoCopy": True,
            "DriverConfig": {
                "Name": "local",
                "Options": {"type": "tmpfs", "device": "tmpfs", "o": options},
            },
        },
    }


def _helper(
    own_labels: Mapping[str, str],
    settings: NodeSettings,
    *,
    name: str,
    part: str,
    image_id: str,
    network_id: str,
    secret: tuple[str, str],
    constraints: Sequence[str],
    script: str,
    args: Sequence[str],
    mounts: Sequence[dict[str, Any]],
    env: Mapping[str, str],
) -> dict[str, Any]:
    """A stager or uploader: medhive's own script in the stager image, confined like a
    workload, with the token as a secret and a network that reaches the datacache."""
    uid, gid = settings.workload_ids
    own = {**own_labels, PART_LABEL: part}
    secret_id, secret_name = secret
    container: dict[str, Any] = {
        "Image": image_id,
        "Labels": own,
        "Command": ["sh", "-c", script, f"medhive-{part}"],
        "Args": list(args),
        "Env": [f"{key}={value}" for key, value in env.items()],
        "User": settings.workload_user,
        "ReadOnly": True,
        "CapabilityDrop": ["ALL"],
        "Init": True,
        "StopGracePeriod": 1_000_000_000,
        "Mounts": [TMP_MOUNT, *mounts],
        "Secrets": [
            {
                "File": {"Name": TOKEN_FILE, "UID": str(uid), "GID": str(gid), "Mode": 0o400},
                "SecretID": secret_id,
                "SecretName": secret_name,
            }
        ],
    }
    return {
        "Name": part_name(name, part),
        "Labels": own,
        "Mode": {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}},
        "TaskTemplate": {
            "ContainerSpec": container,
            "Resources": {"Limits": {"NanoCPUs": 1_000_000_000, "MemoryBytes": 64 * MIB}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": list(constraints)},
            "Networks": [{"Target": network_id}],
        },
    }


def stager_spec(
    run: NodeRun,
    settings: NodeSettings,
    *,
    name: str,
    image_id: str,
    network_id: str,
    secret: tuple[str, str],
    volumes: Sequence[dict[str, Any]],
    files: Sequence[tuple[str, str]],
    datacache_url: str,
) -> dict[str, Any]:
    """The stager of `run`: fetches `files` ((sha256, path under /in)) into `volumes`,
    mounted under /in, and stays `starting` until they are in place (its health check
    passes), then holds them until it is retired or the run's deadline. Swarm picks its
    node from `settings.swarm_constraints`; the workload follows it there."""
    spec = _helper(
        labels(run, settings.node_id), settings, name=name, part="stager", image_id=image_id,
        network_id=network_id, secret=secret, constraints=settings.swarm_constraints,
        script=STAGE_SCRIPT, args=[item for pair in files for item in pair], mounts=volumes,
        env={
            "MEDHIVE_DATACACHE": datacache_url.rstrip("/"),
            "MEDHIVE_JOB": run.job_id,
            "MEDHIVE_UNTIL": str(int(run.deadline.timestamp())),
        },
    )  # fmt: skip
    budget = max(run.deadline.timestamp() - time.time(), 1.0)
    spec["TaskTemplate"]["ContainerSpec"]["Healthcheck"] = {
        "Test": ["CMD", "test", "-e", "/tmp/ready"],
        "Interval": PROBE_NS,
        "Timeout": 1_000_000_000,
        "Retries": 3,
        # Without a start period, the first probe that fails (inputs still on their
        # way) fails the task; with one, it stays `starting` until the inputs are in.
        "StartPeriod": int(budget * 1e9),
    }
    return spec


def uploader_spec(
    own_labels: Mapping[str, str],
    settings: NodeSettings,
    *,
    name: str,
    image_id: str,
    network_id: str,
    secret: tuple[str, str],
    outputs: dict[str, Any],
    swarm_node: str,
    datacache_url: str,
) -> dict[str, Any]:
    """The uploader of a job (`own_labels`: its workload's): on the workload's node,
    reads the results' volume (`outputs`, read-only at /out) and stores each file in
    the datacache."""
    return _helper(
        own_labels, settings, name=name, part="uploader", image_id=image_id, network_id=network_id,
        secret=secret, constraints=[f"node.id=={swarm_node}"], script=UPLOAD_SCRIPT, args=(),
        mounts=[{**outputs, "Target": "/out", "ReadOnly": True}],
        env={
            "MEDHIVE_DATACACHE": datacache_url.rstrip("/"),
            "MEDHIVE_JOB": own_labels["medhive.job_id"],
        },
    )  # fmt: skip


def retired_spec(service: Mapping[str, Any], image_id: str) -> dict[str, Any]:
    """The update that ends a job service's task on whatever node runs it.

    The manager cannot stop a container on another node, and removing a job service
    leaves its running task running (Swarm 20.10). A new job iteration can: Swarm shuts
    the old task down (SIGTERM, SIGKILL after its grace period) and runs the new one,
    here `true` in the stager image, with nothing mounted and no network. The old task
    then leaves Swarm's store with its exit status (measured: within 2 s)."""
    spec = dict(service["Spec"])
    old = spec["TaskTemplate"]
    spec["TaskTemplate"] = {
        "ContainerSpec": {
            "Image": image_id,
            "Command": ["true"],
            "User": old["ContainerSpec"].get("User"),
            "ReadOnly": True,
            "CapabilityDrop": ["ALL"],
            "Labels": {**old["ContainerSpec"].get("Labels", {}), RETIRED_LABEL: "1"},
        },
        "Resources": old.get("Resources", {}),
        "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
        "Placement": old.get("Placement", {}),
        "ForceUpdate": int(old.get("ForceUpdate", 0)) + 1,
    }
    return spec
