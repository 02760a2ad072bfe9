"""A tenant's running quota with real containers: two jobs of a tenant allowed one at a
time never run side by side, though the node has room for both."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime

import pytest

from tests.e2e.support import client, spec, wait_state
from tests.processes import Stack

pytestmark = pytest.mark.slow


async def test_a_running_quota_of_one_job_runs_a_tenants_jobs_one_after_the_other(
    stack: Stack, user_token: str, operator_token: str
) -> None:
    async with client(stack, operator_token) as operator:
        await operator.set_tenant("radiology", {"quota": {"max_running_jobs": 1}})
    async with client(stack, user_token) as api:
        small = {"cpus": 0.5, "memory_mb": 64}
        jobs = [await api.submit(spec(f"one-{i}", "sleep", "1", resources=small)) for i in (1, 2)]
        done = [await wait_state(api, job["id"], within=60) for job in jobs]
    assert [job["state"] for job in done] == ["succeeded", "succeeded"]
    # placed -> ended, in the scheduler's own clock
    spans = sorted((_at(job, "dispatched"), _at(job, "succeeded")) for job in done)
    assert spans[0][1] <= spans[1][0], spans  # the second was placed once the first ended

    env = {**os.environ, "MEDHIVE_API_URL": stack.api, "MEDHIVE_TOKEN": operator_token}
    shown = subprocess.run([sys.executable, "-m", "medhive", "tenants"], env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    row = next(line for line in shown.splitlines() if line.startswith("radiology "))
    assert "jobs 0/1" in row and row.split()[1] == "1", shown  # share 1, quota of one job


def _at(job: dict[str, object], state: str) -> datetime:
    history = job["history"]
    assert isinstance(history, list)
    return datetime.fromisoformat(next(e["at"] for e in history if e["state"] == state))
