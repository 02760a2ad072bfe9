"""What medhive adds to one container: a trivial job end to end against a bare `docker run`.

`python -m bench.container_overhead [--n 15]`

One job at a time goes through the whole system: `POST /v1/jobs` with the API client,
the scheduler stores and places it, the node agent creates, starts, waits for, reads
the output of and removes the container, the scheduler records the end, and the job
API is polled every 20 ms until the job is terminal. Each run alternates with a bare
`docker run --rm --network none medhive/busybox:1 true` timed the same way (from just
before the call until the answer), so both see the same machine state. Two warm-up
runs of each come first and are not counted.

Target: `ratio` (median medhive / median docker run) <= 1.3.

The last line of stdout is one JSON object: `medhive_median_s`, `docker_run_median_s`,
`ratio`, `n`, `rss_mb` (idle RSS of each service process, read before any run), and
for diagnosis the spread of both and the median time a job spent in each state,
from its history (`phases_median_ms`: submitted->dispatched, dispatched->running,
running->succeeded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import datetime
from typing import Any

from bench.stack import Stack, bench_stack, progress
from medhive.client import TERMINAL, Client

IMAGE = "medhive/busybox:1"
POLL_S = 0.02
JOB_TIMEOUT_S = 120.0
WARMUP = 2
DOCKER_RUN = ["docker", "run", "--rm", "--network", "none", IMAGE, "true"]


async def medhive_run(api: Client, name: str) -> tuple[float, dict[str, Any]]:
    """Seconds from submit until the job API shows it terminal, and the final job."""
    spec = {"name": name, "image": IMAGE, "command": ["true"]}
    started = time.perf_counter()
    job = await api.submit(spec)
    async with asyncio.timeout(JOB_TIMEOUT_S):
        while job["state"] not in TERMINAL:
            await asyncio.sleep(POLL_S)
            job = await api.job(job["id"])
    elapsed = time.perf_counter() - started
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('reason')}")
    return elapsed, job


async def docker_run() -> float:
    """Seconds for `docker run --rm --network none IMAGE true`, from spawn to exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *DOCKER_RUN, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"docker run failed ({process.returncode}): {err.decode()[-500:]}")
    return elapsed


def phases_ms(job: dict[str, Any]) -> dict[str, float]:
    """Milliseconds between the first entries of consecutive states in a job's history."""
    at: dict[str, datetime] = {}
    for entry in job["history"]:
        at.setdefault(entry["state"], datetime.fromisoformat(entry["at"]))
    pairs = [("submitted", "dispatched"), ("dispatched", "running"), ("running", "succeeded")]
    return {
        f"{a}->{b}": (at[b] - at[a]).total_seconds() * 1000 for a, b in pairs if a in at and b in at
    }


async def bench(stack: Stack, n: int) -> dict[str, Any]:
    rss = stack.rss_mb()
    progress(f"idle RSS (MiB): {rss}")
    medhive_times: list[float] = []
    docker_times: list[float] = []
    phases: list[dict[str, float]] = []
    async with stack.client() as api:
        for i in range(WARMUP):
            elapsed, _ = await medhive_run(api, f"warmup-{i}")
            progress(f"warm-up medhive {elapsed:.3f} s, docker run {await docker_run():.3f} s")
        for i in range(n):
            stack.check_alive()
            elapsed, job = await medhive_run(api, f"overhead-{i}")
            medhive_times.append(elapsed)
            phases.append(phases_ms(job))
            docker_times.append(await docker_run())
            progress(
                f"run {i + 1}/{n}: medhive {medhive_times[-1]:.3f} s, "
                f"docker run {docker_times[-1]:.3f} s"
            )
    medhive_median = statistics.median(medhive_times)
    docker_median = statistics.median(docker_times)
    keys = sorted({key for p in phases for key in p})
    return {
        "medhive_median_s": round(medhive_median, 4),
        "docker_run_median_s": round(docker_median, 4),
        "ratio": round(medhive_median / docker_median, 3),
        "n": n,
        "rss_mb": rss,
        "medhive_min_max_s": [round(min(medhive_times), 4), round(max(medhive_times), 4)],
        "docker_run_min_max_s": [round(min(docker_times), 4), round(max(docker_times), 4)],
        "phases_median_ms": {
            key: round(statistics.median(p[key] for p in phases if key in p), 1) for key in keys
        },
    }


async def main(n: int) -> dict[str, Any]:
    # Settings as a small real installation would have them (the node's own capacity).
    async with bench_stack(nodes=1, node_env={"MEDHIVE_VMNODE_RUNTIME": "docker"}) as stack:
        return await bench(stack, n)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=15, help="measured runs of each (default 15)")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be at least 1")
    result = asyncio.run(main(args.n))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli()
