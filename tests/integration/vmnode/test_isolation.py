"""What a workload can see and do, observed from inside its own container."""

from __future__ import annotations

import aiodocker

from services.vmnode.settings import NodeSettings
from shared.bus import Bus
from tests.integration.vmnode.conftest import (
    Events,
    new_job,
    node_run,
    running_agent,
    send_run,
    sh,
)

# cgroup v1 on these machines (Docker reports "Cgroup Version: 1"); v2 as a fallback.
PROBE = """
echo "NETDEV $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')"
ip link
if echo x > /probe; then echo ROOTFS=writable; else echo ROOTFS=readonly; fi
if echo x > /tmp/probe; then echo TMP=writable; fi
echo "UID=$(id -u)"
grep CapEff /proc/self/status
v1=/sys/fs/cgroup/memory/memory.limit_in_bytes
echo "MEMORY=$(cat $v1 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
echo "PIDS=$(cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max)"
"""


async def test_workload_has_no_network_no_root_no_capabilities_and_its_limits(
    settings: NodeSettings, scheduler: Bus, events: Events, docker: aiodocker.Docker
) -> None:
    job = new_job()
    async with running_agent(settings):
        await send_run(scheduler, settings.node_id, node_run(job, sh(PROBE), memory_mb=48))
        finished = await events.wait_for("run.finished", job)
    stdout = events.output(job, "stdout")
    assert stdout is not None
    lines = stdout["data"].splitlines()

    assert "NETDEV lo " in lines, "only the loopback interface"
    assert [line for line in lines if ": <" in line] == [
        next(line for line in lines if line.startswith("1: lo:"))
    ], "ip link lists lo alone"
    assert "ROOTFS=readonly" in lines
    assert "TMP=writable" in lines
    assert "UID=65534" in lines
    assert "CapEff:\t0000000000000000" in lines
    assert f"MEMORY={48 * 1024 * 1024}" in lines
    assert "PIDS=64" in lines
    stderr = events.output(job, "stderr")
    assert stderr is not None and "Read-only file system" in stderr["data"]
    assert finished.payload["outcome"] == "succeeded"
