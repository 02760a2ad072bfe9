"""What a node agent leaves in Docker Swarm, found by its label: for the Swarm tests'
clean-up and for their checks that nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiodocker


def _label(node_id: str) -> dict[str, list[str]]:
    return {"label": [f"medhive.node={node_id}"]}


async def remove_everything_of(docker: aiodocker.Docker, node_id: str) -> None:
    """Every service, container and network of the node, gone."""
    label = _label(node_id)
    for service in await docker.services.list(filters=label):
        with contextlib.suppress(aiodocker.DockerError):
            await docker.services.delete(service["ID"])
    for container in await docker.containers.list(all=True, filters=json.dumps(label)):
        with contextlib.suppress(aiodocker.DockerError):
            await container.delete(force=True)
    for network in await docker.networks.list(filters=label):
        with contextlib.suppress(aiodocker.DockerError):
            await docker._query_json(f"networks/{network['Id']}", method="DELETE")


async def leftovers(docker: aiodocker.Docker, node_id: str) -> dict[str, int]:
    label = _label(node_id)
    return {
        "services": len(await docker.services.list(filters=label)),
        "containers": len(await docker.containers.list(all=True, filters=json.dumps(label))),
        "networks": len(await docker.networks.list(filters=label)),
    }


async def nothing_left(docker: aiodocker.Docker, node_id: str, within_s: float = 20) -> None:
    """Wait until the node has no service, container or network left (Swarm removes a
    network a moment after it answered the delete: measured ~0.2 s)."""
    nothing = {"services": 0, "containers": 0, "networks": 0}
    try:
        async with asyncio.timeout(within_s):
            # Polled: the engine has no event for "the last of these is gone".
            while await leftovers(docker, node_id) != nothing:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"left behind: {await leftovers(docker, node_id)}") from None
