"""Container jobs as Docker Swarm services (aiodocker), for sites that run a Swarm.

Each attempt is one service in `replicated-job` mode: one task, never restarted, pinned
to the Swarm node of the engine the agent talks to (`node.id==<its own id>`), with the
confinement of `swarmspec.service_spec` and a network of its own (see there). The
service carries the same labels as a local container, so a restarted agent finds its
services by label (`list_own`) and adopts or reports them.

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

Tasks on other Swarm nodes: the design (tried by hand on a second node, not built here).
The inputs must reach only the node N that runs the task, kept in memory there, never
on storage shared between hosts. Per attempt, everything is pinned to N (`node.id==N`;
N chosen by the agent from the nodes' resources minus what medhive runs there, or by a
constraint):

1. A credential scoped to the attempt (a datacache grant bound to job, attempt, objects
   and the walltime end) becomes a Swarm secret, mounted only into the stager and the
   uploader (a tmpfs file, the workload's uid, 0400). Swarm keeps secrets encrypted in
   the managers' log and sends one only to a node that runs a task using it.
2. A *stager* task holds two local volumes of type tmpfs (`-in`, `-out`, owned by the
   workload's uid, mode 0700) for the attempt's whole life: a local tmpfs volume loses
   its content as soon as no container mounts it. It fetches and opens the sealed
   inputs, checks each SHA-256, makes them read-only, and then passes its health
   check. A task with a health check stays `starting` until healthy, so the agent
   starts the workload when the stager's task is `running`. The check needs a
   StartPeriod as long as the staging budget: without one, the first probe that fails
   fails the task. The stager's network reaches the datacache only.
3. The workload, pinned to N, mounts `-in` read-only and `-out` read-write, on its own
   internal network, as above.
4. An *uploader* job on N mounts `-out` read-only and stores the results with the same
   credential; then the stager ends, and the tmpfs content with it.
5. Ending a task on N: the manager cannot stop a container on another node, and
   removing a job service leaves its running task running. A service *update* (a new
   job iteration whose command is `true`) stops the old task: SIGTERM, then SIGKILL
   after its StopGracePeriod. The stager also exits at the attempt's deadline by its
   own clock, so the inputs never outlive the walltime, even with no agent left.
6. What stays on N: the empty records of the two volumes (the manager has no API to
   remove a node's local volumes); OOM is not in the task status there (exit 137 is
   all that is known); the logs come through the manager's service log stream.

Threats and answers: another node or a manager reading the inputs (they exist only in
N's memory; the secret is readable only inside the stager's and uploader's tasks); the
workload sending data out (no network, read-only inputs, writable only in tmpfs); a
copy left behind (tmpfs volumes die with the stager, which ends by update or at its
deadline; the secret and services are removed with the attempt); a stolen credential
(bound to one attempt and its objects, expiring at the walltime end, revoked on
`data.release`); a node that is not who it claims (Swarm's mutual TLS between nodes,
and every input's SHA-256 checked on arrival). Not built here because it needs what the
runtime cannot add alone: a stager-bound credential from the datacache (grants are
bound to a node agent today) and an image that carries medhive's opening of sealed
objects (`jobdata.unseal`).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiodocker
import structlog

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
from services.vmnode.runtimes.swarmspec import (
    ENDED,
    NEVER_RAN,
    network_spec,
    service_name,
    service_spec,
    workload_state,
)
from services.vmnode.settings import NodeSettings
from shared.messages.jobs import NodeRun

log = structlog.get_logger("medhive.vmnode.swarm")

#: How often Swarm's task state is read while waiting for it (it has no task events).
POLL_S = 0.1
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

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._docker: aiodocker.Docker | None = None
        self._swarm_node: str | None = None

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

    # -- create ---------------------------------------------------------------------

    async def prepare(self, run: NodeRun, mounts: Sequence[Mount] = ()) -> Workload:
        name = service_name(self.settings.node_id, run.job_id, run.attempt)
        try:
            node = await self.swarm_node()
            image_id = await self._image_id(run.spec.image)
            network_id = await self._network(name, run)
            body = service_spec(
                run, self.settings, name=name, image_id=image_id, network_id=network_id,
                swarm_node=node, mounts=mounts,
            )  # fmt: skip
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

    async def _network(self, name: str, run: NodeRun) -> str:
        """The attempt's own internal network (made again by a redelivered run: reused)."""
        try:
            made = await self.docker._query_json(
                "networks/create",
                method="POST",
                data=json.dumps(network_spec(name, run, self.settings.node_id)),
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
                task = await self._until(workload, lambda t: workload_state(t) != "created")
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
        container = await self._container(await self._task_or_gone(workload))
        return None if container is None else engine_time(container["State"].get("StartedAt"))

    async def wait(self, workload: Workload) -> ExitInfo:
        task = await self._until(workload, lambda t: _container_id(t) is not None)
        container_id = _container_id(task)
        if container_id is not None:
            try:  # an event on this engine, rather than polling Swarm for the whole run
                await self.docker.containers.container(container_id).wait()
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
        # Swarm records the end a few milliseconds after the container's exit.
        task = await self._until(workload, lambda t: t["Status"]["State"] in ENDED)
        container = await self._container(task)
        status = task["Status"]
        code = status.get("ContainerStatus", {}).get("ExitCode")
        if status["State"] in NEVER_RAN and not code:
            code = NOT_INVOKED
        limit = task["Spec"]["Resources"]["Limits"].get("MemoryBytes") or 0
        return ExitInfo(
            exit_code=int(code or 0),
            oom_killed=bool(container and container["State"]["OOMKilled"]),
            memory_limit_mb=limit // MIB or None,
            finished_at=engine_time(container["State"].get("FinishedAt")) if container else None,
        )

    async def stop(self, workload: Workload, grace_s: float) -> None:
        """Stop the task's container on this engine. A task still on its way up is
        waited for first (bounded): removing its service would not stop it (Swarm
        leaves a removed job's running task running, measured). One that Swarm never
        placed is ended with its service."""
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                task = await self._until(workload, lambda t: workload_state(t) != "created")
        except WorkloadGone:
            return
        except TimeoutError:
            await self._delete_service(workload.id)
            return
        container_id = _container_id(task)
        if container_id is None or task["Status"]["State"] in ENDED:
            return
        try:
            await self.docker.containers.container(container_id).stop(t=math.ceil(grace_s))
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise

    async def output(self, workload: Workload, limit: int) -> Output:
        """Both streams of the service's log; the log driver bounds what is kept."""
        return await read_logs(self.docker, f"services/{workload.id}/logs", limit)

    async def expose(self, workload: Workload) -> dict[str, str]:
        return {}  # containers have no network, let alone interactive ports

    async def export_outputs(self, workload: Workload, into: Path) -> None:
        return None  # /outputs is a host directory mounted into the task

    # -- clean up and reconcile -----------------------------------------------------

    async def remove(self, workload: Workload) -> None:
        """The service, its task's container (Swarm leaves it behind) and its network."""
        await self._delete_service(workload.id)
        for container in await self._containers(f"com.docker.swarm.service.id={workload.id}"):
            await self._delete_container(container.id)
        await self._delete_network(self._name(workload))

    async def list_own(self) -> list[Workload]:
        """This node's services, adopted by label; what a crash left half-removed goes."""
        wanted = [f"medhive.node={self.settings.node_id}", f"{MANAGED}=1"]
        services = await self.docker.services.list(filters={"label": wanted})
        own = []
        for service in services:
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

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    # -- engine reads -----------------------------------------------------------------

    async def _workload(self, service: Mapping[str, Any]) -> Workload:
        state = workload_state(await self._task(service["ID"]))
        return workload_from(service["ID"], state, service["Spec"]["Labels"])

    async def _task(self, service_id: str) -> Task | None:
        """The service's task (the newest, should Swarm ever have made two)."""
        tasks = await self.docker.tasks.list(filters={"service": [service_id]})
        return max(tasks, key=lambda t: t["CreatedAt"], default=None)

    async def _task_or_gone(self, workload: Workload) -> Task | None:
        try:
            await self.docker.services.inspect(workload.id)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise WorkloadGone(f"service {workload.id} no longer exists") from exc
            raise
        return await self._task(workload.id)

    async def _until(self, workload: Workload, done: Callable[[Task], bool]) -> Task:
        """The task once `done(task)` holds; `WorkloadGone` if the service goes first."""
        while True:
            task = await self._task_or_gone(workload)
            if task is not None and (done(task) or task["Status"]["State"] in ENDED):
                return task
            await asyncio.sleep(POLL_S)  # Swarm publishes no task events to wait on

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
