"""The one place that decides how a workload is confined, checked field by field."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from services.vmnode.runtimes.base import Mount, keep_tail
from services.vmnode.runtimes.docker import container_config, container_name, split_streams
from services.vmnode.settings import NodeSettings
from shared.messages.jobs import JobSpec, NodeRun, Resources
from shared.settings import AmqpSettings

DEADLINE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _run(**spec: object) -> NodeRun:
    fields: dict[str, object] = {"name": "n", "image": "lab/seg:2", **spec}
    return NodeRun(
        job_id="job-1",
        attempt=2,
        tenant="t1",
        spec=JobSpec.model_validate(fields),
        deadline=DEADLINE,
    )


def _settings(**fields: object) -> NodeSettings:
    return NodeSettings.model_validate({"node_id": "n1", "cpus": 2, "memory_mb": 4096, **fields})


def test_workload_is_confined_by_default() -> None:
    run = _run(
        command=["seg", "--in", "/data"],
        env={"MODE": "fast"},
        workdir="/work",
        resources=Resources(cpus=1.5, memory_mb=300, pids=64),
    )
    config = container_config(run, _settings(stop_grace_s=7, log_limit_bytes=64 * 1024))
    host = config["HostConfig"]

    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert config["User"] == "65534:65534"
    assert host["PidsLimit"] == 64
    assert host["Memory"] == 300 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"], "no swap beyond the memory limit"
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Tmpfs"] == {"/tmp": "rw,noexec,nosuid,size=64m"}
    assert host["LogConfig"]["Type"] == "json-file"
    assert host["LogConfig"]["Config"] == {"max-size": "1024k", "max-file": "2"}
    assert host["RestartPolicy"] == {"Name": "no"}
    assert "Binds" not in host and "Mounts" not in host and "Devices" not in host
    assert config["StopTimeout"] == 7

    assert config["Image"] == "lab/seg:2"
    assert config["Cmd"] == ["seg", "--in", "/data"]
    assert config["Env"] == ["MODE=fast"]
    assert config["WorkingDir"] == "/work"
    assert config["Labels"] == {
        "medhive.job_id": "job-1",
        "medhive.attempt": "2",
        "medhive.node": "n1",
        "medhive.tenant": "t1",
        "medhive.deadline": "2030-01-02T03:04:05+00:00",
        "medhive.managed": "1",
    }


def test_job_data_is_bind_mounted_inputs_read_only_outputs_writable() -> None:
    mounts = [Mount(Path("/srv/jobs/j.1/inputs/ct"), "/data/ct"),
              Mount(Path("/srv/jobs/j.1/outputs"), "/outputs", read_only=False)]  # fmt: skip
    host = container_config(_run(), _settings(), mounts)["HostConfig"]
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/srv/jobs/j.1/inputs/ct", "Target": "/data/ct",
         "ReadOnly": True, "BindOptions": {"Propagation": "rprivate"}},
        {"Type": "bind", "Source": "/srv/jobs/j.1/outputs", "Target": "/outputs",
         "ReadOnly": False, "BindOptions": {"Propagation": "rprivate"}},
    ]  # fmt: skip
    assert host["ReadonlyRootfs"] is True and host["NetworkMode"] == "none"


def test_image_defaults_are_kept_when_the_spec_names_none() -> None:
    config = container_config(_run(), _settings())
    assert "Cmd" not in config and "WorkingDir" not in config
    assert config["Env"] == []


def test_container_names_are_valid_and_distinct_per_node_job_and_attempt() -> None:
    names = {
        container_name("n1", "job/1 ü", 1),
        container_name("n1", "job/1 ü", 2),
        container_name("n2", "job/1 ü", 1),
        container_name("n1", "job-1-", 1),
    }
    assert len(names) == 4
    assert all(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name) for name in names)
    assert container_name("n1", "j", 1) == container_name("n1", "j", 1)


def test_workloads_never_run_as_root() -> None:
    for user in ("0", "0:0", "root", "root:65534"):
        with pytest.raises(ValidationError):
            _settings(workload_user=user)


def test_only_the_service_account_is_trusted_by_default() -> None:
    amqp = AmqpSettings(url=SecretStr("amqp://sched:pw@broker:5672/prod"))
    assert amqp.service_users(NodeSettings(amqp=amqp).trusted_users) == {"sched"}


def test_output_keeps_the_last_bytes() -> None:
    assert keep_tail("short", 10) == ("short", False)
    assert keep_tail("0123456789abc", 4) == ("9abc", True)
    text, cut = keep_tail("ééé", 3)  # 6 bytes; the cut splits a character
    assert cut and text == "é"


def test_the_least_cpu_share_still_limits_the_container() -> None:
    """F4 of the HTTP fuzzing: a share too small for Docker once meant no limit at all."""
    smallest = container_config(_run(resources={"cpus": 0.01}), _settings())
    assert smallest["HostConfig"]["NanoCpus"] == 10_000_000
    with pytest.raises(ValidationError, match=r"greater than or equal to 0\.01"):
        Resources(cpus=1e-10)


def _frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


def test_a_log_is_split_into_its_streams_frame_by_frame() -> None:
    raw = (
        _frame(1, b"out 1\n")
        + _frame(2, b"err \xc3\xa9\n")
        + _frame(0, b"stdin is not a stream we keep")
        + _frame(1, b"out 2\n")
        + _frame(2, b"cut sho")[:-3]  # the engine stopped mid-frame
    )
    assert split_streams(raw) == (b"out 1\nout 2\n", b"err \xc3\xa9\ncut ")
    assert split_streams(b"") == (b"", b"")
