"""What a container job becomes in Swarm: names, the service spec, task states."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.vmnode.runtimes.base import Mount
from services.vmnode.runtimes.swarmspec import service_name, service_spec, workload_state
from services.vmnode.settings import NodeSettings
from shared.messages.jobs import JobSpec, NodeRun

DEADLINE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
DNS_LABEL = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")


def _run(job_id: str = "job-1", **spec: object) -> NodeRun:
    fields: dict[str, object] = {"name": "n", "image": "lab/seg:2", **spec}
    return NodeRun(
        job_id=job_id, attempt=2, tenant="t1", spec=JobSpec.model_validate(fields),
        deadline=DEADLINE,
    )  # fmt: skip


def _spec(run: NodeRun, mounts: list[Mount] | None = None) -> dict[str, Any]:
    settings = NodeSettings.model_validate({"node_id": "n1", "cpus": 2, "memory_mb": 4096})
    return service_spec(
        run, settings, name="s", image_id="sha256:abc", network_id="net1",
        constraints=["node.id==sw1"], mounts=mounts or [],
    )  # fmt: skip


@pytest.mark.parametrize("job_id", ["job-1", "a" * 128, "Ünï_cödé.job/x", "-lead-", "__"])
def test_service_names_are_dns_labels_unique_per_attempt(job_id: str) -> None:
    name = service_name("node-1", job_id, 3)
    assert DNS_LABEL.match(name), name
    assert name != service_name("node-1", job_id, 4) != service_name("node-2", job_id, 3)


def test_the_command_keeps_the_entrypoint_and_inputs_are_read_only() -> None:
    spec = _spec(
        _run(command=["seg", "--in", "/data"], env={"MODE": "fast"}, workdir="/work"),
        [Mount(Path("/j/in"), "/data"), Mount(Path("/j/out"), "/outputs", read_only=False)],
    )
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["Args"] == ["seg", "--in", "/data"] and "Command" not in container
    assert container["Env"] == ["MODE=fast"] and container["Dir"] == "/work"
    assert container["Labels"]["medhive.image"] == "lab/seg:2"
    binds = {m["Target"]: m["ReadOnly"] for m in container["Mounts"] if m["Type"] == "bind"}
    assert binds == {"/data": True, "/outputs": False}


@pytest.mark.parametrize(
    ("state", "expected"),
    [(None, "created"), ("pending", "created"), ("starting", "created"),
     ("running", "running"), ("complete", "exited"), ("failed", "exited"),
     ("rejected", "exited"), ("shutdown", "exited")],
)  # fmt: skip
def test_task_states_map_to_workload_states(state: str | None, expected: str) -> None:
    task = None if state is None else {"Status": {"State": state}}
    assert workload_state(task) == expected
