"""One job timed through medhive's job API, as the one-job-at-a-time benchmarks time it
(`bench.container_overhead`, `bench.vm_overhead`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from medhive.client import TERMINAL, Client

#: How often the job API is asked whether the job has ended.
POLL_S = 0.02


async def timed_job(
    api: Client, spec: dict[str, Any], timeout_s: float
) -> tuple[float, dict[str, Any]]:
    """Seconds from submit until the job API shows the job terminal, and the final job;
    a job that ends other than succeeded raises."""
    started = time.perf_counter()
    job = await api.submit(spec)
    async with asyncio.timeout(timeout_s):
        while job["state"] not in TERMINAL:
            await asyncio.sleep(POLL_S)
            job = await api.job(job["id"])
    elapsed = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('reason')}")
    return elapsed, job
