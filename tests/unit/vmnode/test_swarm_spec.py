"""What a container job becomes in Swarm: names, the service spec, task states."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.vmnode.runtimes.base import Mount
from services.vmnode.runtimes.swarmnodes import check_constraints, runs_jobs
from services.vmnode.runtimes.swarmspec import (
    is_retirement,
    retired_spec,
    service_name,
    service_spec,
    stager_spec,
    tmpfs_volume,
    workload_state,
)
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


def _node(**overrides: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "ID": "abc",
        "Description": {
            "Hostname": "ct-1",
            "Platform": {"OS": "linux", "Architecture": "x86_64"},
            "Engine": {"Labels": {"gpu": "none"}},
        },
        "Spec": {"Role": "worker", "Availability": "active", "Labels": {"medhive": "jobs"}},
        "Status": {"State": "ready"},
    }
    node.update(overrides)
    return node


@pytest.mark.parametrize(
    ("constraints", "expected"),
    [
        ([], True),
        (["node.labels.medhive==jobs"], True),
        (["node.labels.medhive == JOBS"], True),  # Swarm compares case-insensitively
        (["node.labels.medhive!=jobs"], False),
        (["node.labels.other==x"], False),
        (["node.labels.other!=x"], True),  # a missing label is unequal to anything
        (["node.role==worker", "node.hostname==ct-1", "node.id==abc"], True),
        (["node.role==manager"], False),
        (["engine.labels.gpu==none", "node.platform.os==linux"], True),
    ],
)
def test_a_node_runs_jobs_when_it_meets_every_constraint(
    constraints: list[str], expected: bool
) -> None:
    assert runs_jobs(_node(), constraints) is expected


def test_a_node_that_is_not_ready_and_active_runs_no_jobs() -> None:
    assert not runs_jobs(_node(Status={"State": "down"}), [])
    drained = _node()
    drained["Spec"] = {**drained["Spec"], "Availability": "drain"}
    assert not runs_jobs(drained, [])


@pytest.mark.parametrize("constraint", ["node.name==x", "node.labels.a", "== x", "node.id=>x"])
def test_a_constraint_the_agent_cannot_read_is_refused_at_start(constraint: str) -> None:
    with pytest.raises(ValueError):
        check_constraints([constraint])


def test_the_stager_is_confined_holds_tmpfs_volumes_and_waits_for_its_inputs() -> None:
    settings = NodeSettings.model_validate(
        {"node_id": "n1", "swarm_constraints": ["node.labels.medhive==jobs"]}
    )
    volume = tmpfs_volume("s-in0", "/in/0", 5 << 20, settings, read_only=False)
    body = stager_spec(
        _run(), settings, name="s", image_id="sha256:bb", network_id="net2",
        secret=("sec1", "s"), volumes=[volume], files=[("ab" * 32, "/in/0/ct.bin")],
        datacache_url="http://10.0.0.1:8082/",
    )  # fmt: skip
    container = body["TaskTemplate"]["ContainerSpec"]
    assert body["Name"] == "s-stager" and body["Labels"]["medhive.part"] == "stager"
    assert container["ReadOnly"] is True and container["CapabilityDrop"] == ["ALL"]
    assert container["User"] == "65534:65534"
    assert container["Args"] == ["ab" * 32, "/in/0/ct.bin"]
    assert "MEDHIVE_DATACACHE=http://10.0.0.1:8082" in container["Env"]
    assert container["Secrets"][0]["File"] == {
        "Name": "medhive-token", "UID": "65534", "GID": "65534", "Mode": 0o400
    }  # fmt: skip
    assert container["Healthcheck"]["StartPeriod"] > 0, "a failing first probe fails no task"
    assert body["TaskTemplate"]["Placement"]["Constraints"] == ["node.labels.medhive==jobs"]
    options = volume["VolumeOptions"]["DriverConfig"]["Options"]
    assert options["type"] == "tmpfs" and "uid=65534" in options["o"] and "noexec" in options["o"]


def test_a_retired_service_runs_only_true_where_it_ran() -> None:
    running = {"Spec": _spec(_run(), [Mount(Path("/j/in"), "/data/in")])}
    retired = retired_spec(running, "sha256:bb")
    template = retired["TaskTemplate"]
    assert template["ContainerSpec"]["Command"] == ["true"]
    assert "Mounts" not in template["ContainerSpec"] and "Networks" not in template
    assert template["Placement"] == running["Spec"]["TaskTemplate"]["Placement"]
    assert template["ForceUpdate"] == 1, "a new job iteration, which ends the old task"
    assert is_retirement({"Spec": template})
    assert not is_retirement({"Spec": running["Spec"]["TaskTemplate"]})
