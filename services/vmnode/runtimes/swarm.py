"""Container jobs as Docker Swarm services (aiodocker), for sites that run a Swarm.

Each attempt is one service in `replicated-job` mode: one task, never restarted, pinned
to the Swarm node of the engine the agent talks to (`node.id==<its own id>`) or sent to
another node (below), with the confinement of `swarmspec.service_spec` and a network of
its own (see there). The service carries the same labels as a local container, so a
restarted agent finds its services by label (`list_own`) and adopts or reports them.

Data path (one node). The agent fetches the job's inputs from the datacache into a
private per-job directory on this host, kept in memory (jobdata.py: a tmpfs when they
fit), and the task bind-mounts it read-only; `/outputs` is a host tmpfs the agent
collects after the run, as with the local runtime. Because the task is pinned to this
host, inputs never cross the network and never touch storage shared between hosts.

What Swarm does not give, and what the runtime does instead, on the pinned node:

- stop: Swarm has no "stop this task". The task's container runs on this engine, so it
  is stopped there (SIGTERM, SIGKILL after the grace period); the task then ends as
  `failed` and is never restarted. Removing the service is no stop: Swarm 20.10
  leaves a removed job service's running task running (measured: 54 s and on), so a
  task still starting is waited for, then stopped.
- OOM: the task status says only "non-zero exit (137)"; the container says
  `OOMKilled`, and is asked. Its start and end times come from it too (a task's
  timestamp moves with every state change; the agent needs times that do not).
- cleanup: a removed job service leaves its task container behind (measured: still
  there 4 s later), so `remove` deletes it, and the job's network, itself.

Tasks on other Swarm nodes (`swarm_constraints` set). The inputs reach only the node N
that runs the task, kept in memory there, never on storage shared between hosts. Per
attempt (the helpers' specs are in swarmspec.py):

1. The agent asks the datacache for a token that stands for this node on the
   attempt's grant only (`POST /v1/jobs/{job}/delegates`; it dies with the grant) and
   keeps it as a Swarm secret, mounted only into the stager and the uploader (uid of
   the workload, 0400). Swarm keeps secrets encrypted in the managers' log and sends
   one only to a node that runs a task using it.
2. A *stager* (medhive's script in the busybox stager image, confined like a workload)
   is placed by Swarm on a node matching the constraints: N. It mounts one local tmpfs
   volume per input and one for the results, fetches each object from the datacache
   under the token, checks its SHA-256, makes the inputs read-only, and then passes its
   health check: a task with a health check stays `starting` until healthy, so
   `running` means "inputs in place". It then holds the volumes, because a local tmpfs
   volume loses its content when no container mounts it, until it is retired or the
   attempt's deadline passes by its own clock, so the inputs never outlive the
   walltime even with no agent left. Its network is its own and reaches the datacache.
3. The workload is pinned to N (`node.id==N`), mounts the inputs' volumes read-only at
   their paths and the results' at /outputs, on its own internal network, as above.
4. After it ends, an *uploader* on N mounts the results read-only and stores each
   regular file in the datacache with the token; what the datacache answered (one JSON
   line per file) is the run's list of outputs, read from the uploader's log.
5. Ending a task on N: the manager cannot stop a container on another node, and
   removing a job service leaves its running task running. A service *update* (a new
   job iteration running `true`, `swarmspec.retired_spec`) makes Swarm shut the old
   task down: SIGTERM, then SIGKILL after its grace period. That is how walltime and
   cancel stop a workload on N, and how the stager is ended, before the services, the
   secret and the networks are removed.
6. What N does not give back: the task's OOM flag (exit 137 is all the task status
   says), and the empty records of the volumes (the manager has no API to remove a
   node's local volumes). The logs come through the manager's service log stream; the
   start and end times are Swarm's (the task's creation, its final state).

Threats and answers: another node or a manager reading the inputs (they exist only in
N's memory; the token is readable only inside the stager's and uploader's tasks); the
workload sending data out (no network, read-only inputs, writable only in tmpfs); a
copy left behind (the tmpfs volumes die with the stager, which ends by update or at its
deadline; the secret and services are removed with the attempt); a stolen token (it
reaches one grant's objects and results, expires with the walltime, is revoked on
`data.release`, and cannot issue tokens); the plaintext on the wire between the
datacache and N (the stager reads the decrypting route: run the datacache behind TLS
where nodes are not on a trusted network); a node that is not who it claims (Swarm's
mutual TLS between nodes, and every input's SHA-256 checked on arrival).

One module because every step of an attempt (create, start, wait, stop, the stager and
the uploader on another node, removal, adoption after a restart) reads and writes the
same Swarm objects named after the attempt: its service, helper services, secret,
networks and volumes. `remove`, `_remove_parts` and `_sweep` must know every object the
other steps make; the specs of those objects are in swarmspec.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pydantic
import structlog

from services.vmnode.jobdata import DataUnavailable, JobData
from services.vmnode.runtimes.base import (
    EngineUnavailable,
    ExitInfo,
    ImageMissing,
    Mount,
    Output,
    Workload,
    WorkloadGone,
    WorkloadRefused,
)
from services.vmnode.runtimes.docker import (
    MANAGED,
    MIB,
    UNREACHABLE,
    engine_time,
    read_logs,
    workload_from,
)
from services.vmnode.runtimes.swarmnodes import check_constraints, runs_jobs
from services.vmnode.runtimes.swarmspec import (
    ENDED,
    IMAGE_LABEL,
    NEVER_RAN,
    OUTPUTS_LABEL,
    PART_LABEL,
    is_retirement,
    network_spec,
    part_name,
    retired_spec,
    service_name,
    service_spec,
    stager_spec,
    tmpfs_volume,
    uploader_spec,
    workload_state,
)
from services.vmnode.settings import NodeSettings
from shared.messages.data import OUTPUTS_PATH, StagedFile
from shared.messages.jobs import NodeRun

log = structlog.get_logger("medhive.vmnode.swarm")

#: How often Swarm's task state is read while waiting for it (it has no task events):
#: at first, and at most (a task on another node is waited for by reading its state).
POLL_S = 0.1
POLL_MAX_S = 2.0
#: How long a retired helper's task gets to end before its service is removed anyway.
RETIRE_WAIT_S = 30.0
#: How long a task may stay unscheduled (e.g. no node with the resources) before the
#: run is refused.
START_TIMEOUT_S = 60.0
#: Docker's exit code for a command that could not be invoked (a task Swarm rejected).
NOT_INVOKED = 126

Task = Mapping[str, Any]


def _unavailable(exc: aiodocker.DockerError) -> bool:
    return exc.status == UNREACHABLE


class SwarmRuntime:
    """The `Runtime` over a Swarm manager whose own node runs the tasks. Never pulls."""

    kinds: tuple[str, ...] = ("container",)

    def __init__(self, settings: NodeSettings, data: JobData | None = None) -> None:
        self.settings = settings
        #: The datacache as this node sees it: the manifest and delegated tokens.
        self.data = data or JobData(settings)
        #: Jobs go to the Swarm nodes the constraints name, their data through a stager.
        self.remote = bool(settings.swarm_constraints)
        check_constraints(settings.swarm_constraints)
        self._docker: aiodocker.Docker | None = None
        self._swarm_node: str | None = None
        #: What tasks stopped on another node printed, read before they were stopped:
        #: their logs leave Swarm with them.
        self._stopped: dict[str, Output] = {}

    @property
    def docker(self) -> aiodocker.Docker:
        # Created on first use, inside the running loop (aiohttp sessions need one).
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.settings.docker_url)
        return self._docker

    async def swarm_node(self) -> str:
        """This engine's Swarm node id; refuses when it is not an active manager."""
        if self._swarm_node is None:
            swarm = (await self.docker.system.info()).get("Swarm") or {}
            if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
                raise WorkloadRefused(
                    f"the Docker engine of node {self.settings.node_id} is not a Swarm "
                    "manager (docker swarm init)"
                )
            self._swarm_node = str(swarm["NodeID"])
        return self._swarm_node

    def _name(self, workload: Workload) -> str:
        return service_name(self.settings.node_id, workload.job_id, workload.attempt)

    def brings_data(self, run: NodeRun) -> bool:
        return self.remote

    async def capacity(self) -> tuple[float, int] | None:
        """What the Swarm nodes that run its jobs have, together: the agent's own node,
        or every ready, active node the constraints name. Capacity set in the agent's
        settings (`MEDHIVE_VMNODE_CPUS`, `_MEMORY_MB`) wins: a site may keep some back."""
        if {"cpus", "memory_mb"} <= self.settings.model_fields_set:
            return None
        own = await self.swarm_node()
        constraints = self.settings.swarm_constraints or [f"node.id=={own}"]
        nodes = [n for n in await self.docker.nodes.list() if runs_jobs(n, constraints)]
        resources = [n["Description"]["Resources"] for n in nodes]
        cpus = sum(r.get("NanoCPUs", 0) for r in resources) / 1e9
        memory_mb = sum(r.get("MemoryBytes", 0) for r in resources) // MIB
        given = self.settings.model_fields_set
        return (
            self.settings.cpus if "cpus" in given else cpus,
            self.settings.memory_mb if "memory_mb" in given else memory_mb,
        )

    @property
    def _datacache_url(self) -> str:
        return self.settings.swarm_datacache_url or self.settings.datacache_url

    # -- create ---------------------------------------------------------------------

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        name = service_name(self.settings.node_id, run.job_id, run.attempt)
        try:
            constraints = [f"node.id=={await self.swarm_node()}"]
            image_id = await self._image_id(run.spec.image)
            network_id = await self._network(name, run)
            volumes: list[dict[str, Any]] = []
            if self.remote:
                constraints = list(self.settings.swarm_constraints)
                if run.spec.needs_data:
                    try:
                        node, volumes = await self._stage(run, name)
                    except WorkloadRefused:
                        await self._remove_parts(name)
                        await self._delete_network(name)
                        raise
                    constraints = [f"node.id=={node}"]
            body = service_spec(
                run, self.settings, name=name, image_id=image_id, network_id=network_id,
                constraints=constraints, mounts=mounts, volumes=volumes,
            )  # fmt: skip
            if volumes and run.spec.outputs is not None:
                body["Labels"][OUTPUTS_LABEL] = str(run.spec.outputs.max_mb)
            created = await self.docker._query_json(
                "services/create", method="POST", data=json.dumps(body)
            )
        except aiodocker.DockerError as exc:
            if _unavailable(exc):
                raise EngineUnavailable(exc.message) from exc
            if exc.status == 409:  # this attempt's service exists: reuse it
                return await self._workload(await self.docker.services.inspect(name))
            raise WorkloadRefused(f"Swarm refused the service: {exc.message}") from exc
        labels = body["Labels"]
        return workload_from(created["ID"], "created", labels)

    async def _image_id(self, image: str) -> str:
        try:
            found = await self.docker.images.inspect(image)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise ImageMissing(
                    f"image {image!r} is not present on node {self.settings.node_id} "
                    "(medhive does not pull)"
                ) from exc
            raise
        return str(found["Id"])

    async def _network(self, name: str, run: NodeRun, internal: bool = True) -> str:
        """The attempt's own internal network (made again by a redelivered run: reused)."""
        try:
            made = await self.docker._query_json(
                "networks/create",
                method="POST",
                data=json.dumps(network_spec(name, run, self.settings.node_id, internal)),
            )
            return str(made["Id"])
        except aiodocker.DockerError as exc:
            if exc.status != 409:
                raise
        return str((await self.docker._query_json(f"networks/{name}"))["Id"])

    # -- run ------------------------------------------------------------------------

    async def start(self, workload: Workload) -> None:
        """Swarm starts the task by itself: wait until it runs (or already ended)."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                task = await self._until(workload.id, lambda t: workload_state(t) != "created")
        except TimeoutError:
            status = (await self._task(workload.id) or {}).get("Status", {})
            why = status.get("Err") or status.get("Message") or "no task"
            raise WorkloadRefused(
                f"Swarm did not start the task in {START_TIMEOUT_S:.0f} s: {why}"
            ) from None
        except WorkloadGone as exc:
            raise WorkloadRefused(f"the service went before its task started: {exc}") from exc
        except aiodocker.DockerError as exc:
            if _unavailable(exc):
                raise EngineUnavailable(exc.message) from exc
            raise
        if task["Status"]["State"] in NEVER_RAN:
            raise WorkloadRefused(f"Swarm could not start the task: {task['Status'].get('Err')}")

    async def started_at(self, workload: Workload) -> datetime | None:
        """From the container where it runs here; for a task on another node, when
        Swarm created it (the one time of a task that never changes)."""
        task = await self._task_or_gone(workload.id)
        container = await self._container(task)
        if container is not None:
            return engine_time(container["State"].get("StartedAt"))
        if task is not None and not await self._here(task):
            return engine_time(task.get("CreatedAt"))
        return None

    async def wait(self, workload: Workload) -> ExitInfo:
        try:
            return await self._wait(workload)
        except WorkloadGone:
            if workload.id in self._stopped:  # its task left Swarm with its exit status
                return ExitInfo(exit_code=None, oom_killed=False)
            raise

    async def _wait(self, workload: Workload) -> ExitInfo:
        task = await self._until(workload.id, lambda t: _container_id(t) is not None)
        container_id = _container_id(task)
        if container_id is not None:
            try:  # an event on this engine, rather than polling Swarm for the whole run
                await self.docker.containers.container(container_id).wait()
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        # Swarm records the end a few milliseconds after the container's exit; a task on
        # another node is waited for here, for as long as it runs.
        task = await self._until(workload.id, lambda t: False, patient=True)
        container = await self._container(task)
        status = task["Status"]
        code = status.get("ContainerStatus", {}).get("ExitCode")
        if status["State"] in NEVER_RAN and not code:
            code = NOT_INVOKED
        limit = task["Spec"]["Resources"]["Limits"].get("MemoryBytes") or 0
        if container is not None:
            finished_at = engine_time(container["State"].get("FinishedAt"))
        else:  # on another node: when Swarm recorded the end (no OOM flag there)
            finished_at = engine_time(status.get("Timestamp"))
        return ExitInfo(
            exit_code=int(code or 0),
            oom_killed=bool(container and container["State"]["OOMKilled"]),
            memory_limit_mb=limit // MIB or None,
            finished_at=finished_at,
        )

    async def stop(self, workload: Workload, grace_s: float) -> None:
        """Stop the task's container on this engine, or retire the service of a task
        on another node (`swarmspec.retired_spec`). A task still on its way up is
        waited for first (bounded): removing its service would not stop it (Swarm
        leaves a removed job's running task running, measured). One that Swarm never
        placed is ended with its service."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                task = await self._until(workload.id, lambda t: workload_state(t) != "created")
        except WorkloadGone:
            return
        except TimeoutError:
            await self._delete_service(workload.id)
            return
        container_id = _container_id(task)
        if container_id is None or task["Status"]["State"] in ENDED:
            return
        if not await self._here(task):
            self._stopped[workload.id] = await self.output(workload, self.settings.log_limit_bytes)
            await self._retire(workload.id, grace_s + RETIRE_WAIT_S)
            return
        try:
            await self.docker.containers.container(container_id).stop(t=math.ceil(grace_s))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def output(self, workload: Workload, limit: int) -> Output:
        """Both streams of the service's log; the log driver bounds what is kept."""
        if (kept := self._stopped.get(workload.id)) is not None:
            return kept
        return await read_logs(self.docker, f"services/{workload.id}/logs", limit)

    async def expose(self, workload: Workload) -> dict[str, str]:
        return {}  # containers have no network, let alone interactive ports

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        return None  # /outputs is a host directory mounted into the task

    # -- an attempt on another node: its data through a stager and an uploader --------

    async def _stage(self, run: NodeRun, name: str) -> tuple[str, list[dict[str, Any]]]:
        """Start the attempt's stager where Swarm places it and wait until it holds the
        inputs; (its node, the volumes the workload mounts). Refused, and its parts
        removed, when the inputs cannot be placed."""
        try:
            manifest = await self.data.manifest(run.job_id)
            secret = await self._secret(name, run)
        except (DataUnavailable, aiohttp.ClientError) as exc:
            raise WorkloadRefused(f"the job's data could not be placed: {exc}") from exc
        held: list[dict[str, Any]] = []  # what the stager mounts
        mounts: list[dict[str, Any]] = []  # what the workload mounts
        files: list[tuple[str, str]] = []
        for index, item in enumerate(manifest):
            size = sum(f.size for f in item.files) + MIB
            source = f"{name}-in{index}"
            held.append(tmpfs_volume(source, f"/in/{index}", size, self.settings, read_only=False))
            mounts.append(tmpfs_volume(source, item.path, size, self.settings, read_only=True))
            for entry in item.files:
                if entry.path.startswith("/") or ".." in Path(entry.path).parts:
                    raise WorkloadRefused(f"input file {entry.path!r} would escape its directory")
                files.append((entry.sha256, f"/in/{index}/{entry.path}"))
        if run.spec.outputs is not None:
            results = self._results_volume(name, run.spec.outputs.max_mb)
            held.append({**results, "Target": "/out"})
            mounts.append(results)
        image_id = await self._image_id(self.settings.swarm_stager_image)
        network_id = await self._network(part_name(name, "stager"), run, internal=False)
        body = stager_spec(
            run, self.settings, name=name, image_id=image_id, network_id=network_id, secret=secret,
            volumes=held, files=files, datacache_url=self._datacache_url,
        )  # fmt: skip
        service_id = await self._create(body)
        try:
            task = await self._until(service_id, lambda t: workload_state(t) == "running")
        except WorkloadGone as exc:
            raise WorkloadRefused(f"the job's stager went: {exc}") from exc
        if task["Status"]["State"] != "running":
            logged = await read_logs(self.docker, f"services/{service_id}/logs", 2048)
            why = (logged.stderr or logged.stdout).strip() or task["Status"].get("Err")
            raise WorkloadRefused(f"the job's inputs could not be placed on its Swarm node: {why}")
        log.info("inputs_staged", swarm_node=task["NodeID"], files=len(files))
        return str(task["NodeID"]), mounts

    def _results_volume(self, name: str, max_mb: int) -> dict[str, Any]:
        return tmpfs_volume(
            f"{name}-out", OUTPUTS_PATH, max_mb * MIB, self.settings, read_only=False
        )

    async def _secret(self, name: str, run: NodeRun) -> tuple[str, str]:
        """The attempt's delegated token as a Swarm secret (id, name), made once."""
        try:
            found = await self.docker._query_json(f"secrets/{name}")
            return str(found["ID"]), name
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
        token = await self.data.delegate(run.job_id)
        body = {
            "Name": name,
            "Labels": {"medhive.node": self.settings.node_id, "medhive.job_id": run.job_id},
            "Data": base64.b64encode(token.encode()).decode(),
        }
        made = await self.docker._query_json("secrets/create", method="POST", data=json.dumps(body))
        return str(made["ID"]), name

    async def _create(self, body: dict[str, Any]) -> str:
        """A service from `body`, or the one of that name that exists (a redelivery)."""
        try:
            made = await self.docker._query_json(
                "services/create", method="POST", data=json.dumps(body)
            )
            return str(made["ID"])
        except aiodocker.DockerError as exc:
            if exc.status != 409:
                raise
        return str((await self.docker.services.inspect(body["Name"]))["ID"])

    async def stored_outputs(self, workload: Workload) -> list[StagedFile] | None:
        """For a task on another node: its uploader stores /outputs from that node, and
        says what the datacache stored (one JSON answer per line of its output)."""
        if not self.remote:
            return None
        service = await self.docker.services.inspect(workload.id)
        own = service["Spec"]["Labels"]
        task = await self._task(workload.id)
        if OUTPUTS_LABEL not in own or task is None:
            return []
        name = self._name(workload)
        network = await self.docker._query_json(f"networks/{part_name(name, 'stager')}")
        secret = await self.docker._query_json(f"secrets/{name}")
        body = uploader_spec(
            {k: v for k, v in own.items() if k not in (OUTPUTS_LABEL, IMAGE_LABEL)}, self.settings,
            name=name, image_id=await self._image_id(self.settings.swarm_stager_image),
            network_id=str(network["Id"]), secret=(str(secret["ID"]), name),
            outputs=self._results_volume(name, int(own[OUTPUTS_LABEL])),
            swarm_node=str(task["NodeID"]), datacache_url=self._datacache_url,
        )  # fmt: skip
        uploader = await self._create(body)
        ended = await self._until(uploader, lambda t: False)
        logged = await read_logs(
            self.docker, f"services/{uploader}/logs", self.settings.log_limit_bytes
        )
        if ended["Status"].get("ContainerStatus", {}).get("ExitCode") != 0:
            why = logged.stderr.strip() or ended["Status"].get("Err") or ended["Status"]["State"]
            raise WorkloadRefused(f"the results could not be stored from the job's node: {why}")
        try:
            return [
                StagedFile.model_validate_json(line) for line in logged.stdout.splitlines() if line
            ]
        except pydantic.ValidationError as exc:
            raise WorkloadRefused(f"the uploader's answer was not understood: {exc}") from exc

    async def _retire(self, service_id: str, within_s: float) -> None:
        """End the service's task wherever it runs (`retired_spec`), and wait for it."""
        try:
            service = await self.docker.services.inspect(service_id)
            spec = retired_spec(service, await self._image_id(self.settings.swarm_stager_image))
            version = service["Version"]["Index"]
            await self.docker._query_json(
                f"services/{service_id}/update",
                method="POST",
                params={"version": version},
                data=json.dumps(spec),
            )
            async with asyncio.timeout(within_s):
                await self._until(service_id, lambda t: False)
        except WorkloadGone:
            return
        except TimeoutError:
            log.warning("retired_task_still_running", service_id=service_id)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def _remove_parts(self, name: str) -> None:
        """The attempt's stager (retired first: it holds the data), uploader, token
        secret and stager network."""
        await self._delete_service(part_name(name, "uploader"))
        try:
            stager = await self.docker.services.inspect(part_name(name, "stager"))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise
        else:
            await self._retire(stager["ID"], RETIRE_WAIT_S)
            await self._delete_service(stager["ID"])
        await self._delete_secret(name)
        await self._delete_network(part_name(name, "stager"))

    async def _here(self, task: Task) -> bool:
        return bool(task.get("NodeID") == await self.swarm_node())

    # -- clean up and reconcile -----------------------------------------------------

    async def remove(self, workload: Workload) -> None:
        """The service, its task's container (Swarm leaves it behind) and its network."""
        await self._delete_service(workload.id)
        self._stopped.pop(workload.id, None)
        for container in await self._containers(f"com.docker.swarm.service.id={workload.id}"):
            await self._delete_container(container.id)
        await self._remove_parts(self._name(workload))
        await self._delete_network(self._name(workload))

    async def list_own(self) -> list[Workload]:
        """This node's services, adopted by label; what a crash left half-removed goes."""
        wanted = [f"medhive.node={self.settings.node_id}", f"{MANAGED}=1"]
        services = await self.docker.services.list(filters={"label": wanted})
        own = []
        for service in services:
            if PART_LABEL in service["Spec"]["Labels"]:
                continue  # a stager or uploader: removed with its workload
            try:
                own.append(await self._workload(service))
            except (KeyError, ValueError, TypeError):  # labelled by hand, not by an agent
                log.warning("service_labels_invalid", service_id=service["ID"])
        await self._sweep({s["ID"] for s in services}, {s["Spec"]["Name"] for s in services})
        return own

    async def _sweep(self, service_ids: set[str], names: set[str]) -> None:
        """Task containers and networks of this node whose service is gone."""
        for container in await self._containers(f"medhive.node={self.settings.node_id}"):
            if container["Labels"].get("com.docker.swarm.service.id") not in service_ids:
                log.info("task_container_orphaned", container_id=container.id)
                await self._delete_container(container.id)
        found = await self.docker.networks.list(
            filters={"label": [f"medhive.node={self.settings.node_id}"]}
        )
        for network in found:
            if network["Name"] not in names:
                log.info("network_orphaned", network=network["Name"])
                await self._delete_network(network["Name"])
        secrets = await self.docker._query_json(
            "secrets",
            params={"filters": json.dumps({"label": [f"medhive.node={self.settings.node_id}"]})},
        )
        for secret in secrets:
            if secret["Spec"]["Name"] not in names:
                log.info("secret_orphaned", secret=secret["Spec"]["Name"])
                await self._delete_secret(secret["Spec"]["Name"])

    async def close(self) -> None:
        await self.data.close()
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    # -- engine reads -----------------------------------------------------------------

    async def _workload(self, service: Mapping[str, Any]) -> Workload:
        state = workload_state(await self._task(service["ID"]))
        return workload_from(service["ID"], state, service["Spec"]["Labels"])

    async def _task(self, service_id: str) -> Task | None:
        """The service's own task (a retired service also has a `true` one)."""
        tasks = await self.docker.tasks.list(filters={"service": [service_id]})
        own = [task for task in tasks if not is_retirement(task)]
        return max(own, key=lambda t: t["CreatedAt"], default=None)

    async def _task_or_gone(self, service_id: str) -> Task | None:
        try:
            service = await self.docker.services.inspect(service_id)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise WorkloadGone(f"service {service_id} no longer exists") from exc
            raise
        task = await self._task(service_id)
        if task is None and service["Spec"]["TaskTemplate"].get("ForceUpdate"):
            raise WorkloadGone(f"service {service_id} was retired and its task has gone")
        return task

    async def _until(
        self, service_id: str, done: Callable[[Task], bool], patient: bool = False
    ) -> Task:
        """The task once `done(task)` holds or it ended; `WorkloadGone` if the service
        goes first. Read every 0.1 s; `patient`ly, less and less often (up to every
        2 s): a task on another node is waited for this way for as long as it runs."""
        pause = POLL_S
        while True:
            task = await self._task_or_gone(service_id)
            if task is not None and (done(task) or task["Status"]["State"] in ENDED):
                return task
            await asyncio.sleep(pause)  # Swarm publishes no task events to wait on
            if patient:
                pause = min(pause * 1.2, POLL_MAX_S)

    async def _container(self, task: Task | None) -> Mapping[str, Any] | None:
        """The task's container as this engine shows it (None if it has none, or no longer)."""
        container_id = _container_id(task)
        if container_id is None:
            return None
        try:
            return await self.docker.containers.container(container_id).show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise

    async def _containers(self, label: str) -> list[aiodocker.containers.DockerContainer]:
        return await self.docker.containers.list(all=True, filters=json.dumps({"label": [label]}))

    async def _delete_service(self, service_id: str) -> None:
        try:
            await self.docker.services.delete(service_id)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def _delete_container(self, container_id: str) -> None:
        try:
            await self.docker.containers.container(container_id).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):  # gone, or its removal is under way
                raise

    async def _delete_secret(self, name: str) -> None:
        try:
            await self.docker._query_json(f"secrets/{name}", method="DELETE")
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def _delete_network(self, name: str) -> None:
        try:
            await self.docker._query_json(f"networks/{name}", method="DELETE")
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


def _container_id(task: Task | None) -> str | None:
    if task is None:
        return None
    found = task["Status"].get("ContainerStatus", {}).get("ContainerID")
    return str(found) if found else None
