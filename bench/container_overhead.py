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

`python -m bench.container_overhead --parallel 4 --jobs 100 [--rounds 3]` measures
throughput instead: the node offers P cpus and each job asks for 1, so it runs P at a
time; N jobs are submitted at once and followed on the audit's SSE stream until every
one has ended. Against it, N bare `docker run --rm` with at most P at a time. The two
alternate `--rounds` times (after one uncounted round of each). Keys: `medhive_per_s`
and `docker_per_s` (medians of the rounds), `parallel_ratio` = medhive / docker
(target >= 0.95: a slot that frees is refilled at once, and a job costs the node little
beyond Docker's own create, start, wait and remove). A third case alternates with them:
the same `docker run --rm`, in the confinement the node agent gives a job
(`confined_run`: no capabilities, read-only root, tini, limits, the workload user):
`docker_confined_per_s` and `confined_ratio` = medhive / that, the share of the gap
that is the engine's own cost of the confinement rather than medhive's. The CPU each
side spends per job (`medhive_cpu_ms_per_job`, `docker_cpu_ms_per_job`,
`docker_confined_cpu_ms_per_job`) is broken down by process: the stack's services, the
engine's daemons, RabbitMQ and the references' `docker run` CLIs (`cli`), so that the
gap between the two sides can be read off by process.

The last line of stdout is one JSON object: `medhive_median_s`, `docker_run_median_s`,
`ratio`, `n`, `rss_mb` (idle RSS of each service process, read before any run), and
for diagnosis the spread of both and the median time a job spent in each state,
from its history (`phases_median_ms`: submitted->dispatched, dispatched->running,
running->succeeded).

One module because its modes are one comparison, a medhive job against the engine
doing the same: they share the job (`IMAGE`, `PARALLEL_SPEC`), the references that
Docker runs (`docker_run`, `docker_batch`, `confined_run`, `swarm_run`) and how a median
becomes a ratio (`_medians_and_ratio`), so a change to one side must be made on the
other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import datetime, timedelta
from typing import Any

from bench.control_plane import DB_OPS, audit_head, db_ops, median_of, submit_all
from bench.jobs import timed_job
from bench.stack import (
    RABBITMQ_PROCESS,
    Stack,
    bench_stack,
    machine_busy_s,
    named_cpu_s,
    progress,
)
from medhive.client import Client
from services.vmnode.runtimes.docker import container_config
from services.vmnode.settings import NodeSettings
from shared.envelope import utcnow
from shared.messages.jobs import JobSpec, JobState, NodeRun

IMAGE = "medhive/busybox:1"
JOB_TIMEOUT_S = 120.0
WARMUP = 2
DOCKER_RUN = ["docker", "run", "--rm", "--network", "none", IMAGE, "true"]
#: The node a Swarm reference task runs on when no constraint is given: this engine's.
OWN_NODE = "node.id==$(docker info -f '{{.Swarm.NodeID}}')"


def swarm_run(constraints: list[str]) -> list[str]:
    """The reference of `--runtime swarm`: the same image as a one-task job service,
    placed as the agent places its jobs, created, waited for (the CLI waits for a job)
    and removed. The image is named by its id, as the agent names it: by name, a node
    other than the manager tries a registry first (20 s here, with none reachable)."""
    placed = " ".join(f"--constraint '{c}'" for c in constraints) or f"--constraint {OWN_NODE}"
    return [
        "sh", "-c",
        "id=$(docker service create -q --detach=false --mode replicated-job"
        f" --restart-condition none {placed}"
        f" $(docker image inspect -f '{{{{.Id}}}}' {IMAGE}) true) && "
        "docker service rm \"$id\" >/dev/null",
    ]  # fmt: skip


#: The events that end a job.
ENDS = {f"job.{state.value}" for state in JobState if state.terminal}


async def medhive_run(api: Client, name: str) -> tuple[float, dict[str, Any]]:
    """The trivial job (`true` in `IMAGE`), timed from submit until terminal; its job."""
    return await timed_job(api, {"name": name, "image": IMAGE, "command": ["true"]}, JOB_TIMEOUT_S)


async def docker_run(reference: list[str] = DOCKER_RUN) -> float:
    """Seconds for the reference (`docker run --rm --network none IMAGE true`), from
    spawn to exit."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *reference, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"docker run failed ({process.returncode}): {err.decode()[-500:]}")
    return elapsed


def _medians_and_ratio(
    names: tuple[str, str, str], medhive: list[float], reference: list[float], digits: int
) -> dict[str, float]:
    """The median of medhive's samples and of the reference's, rounded to `digits`, under
    the first two names, and the first median over the second (what a target names) under
    the third."""
    ours, theirs = statistics.median(medhive), statistics.median(reference)
    return {
        names[0]: round(ours, digits),
        names[1]: round(theirs, digits),
        names[2]: round(ours / theirs, 3),
    }


def phases_ms(job: dict[str, Any]) -> dict[str, float]:
    """Milliseconds between the first entries of consecutive states in a job's history."""
    at: dict[str, datetime] = {}
    for entry in job["history"]:
        at.setdefault(entry["state"], datetime.fromisoformat(entry["at"]))
    pairs = [("submitted", "dispatched"), ("dispatched", "running"), ("running", "succeeded")]
    return {
        f"{a}->{b}": (at[b] - at[a]).total_seconds() * 1000 for a, b in pairs if a in at and b in at
    }


async def bench(stack: Stack, n: int, reference: list[str] = DOCKER_RUN) -> dict[str, Any]:
    rss = stack.rss_mb()
    progress(f"idle RSS (MiB): {rss}")
    medhive_times: list[float] = []
    docker_times: list[float] = []
    phases: list[dict[str, float]] = []
    async with stack.client() as api:
        for i in range(WARMUP):
            elapsed, _ = await medhive_run(api, f"warmup-{i}")
            progress(
                f"warm-up medhive {elapsed:.3f} s, reference {await docker_run(reference):.3f} s"
            )
        for i in range(n):
            stack.check_alive()
            elapsed, job = await medhive_run(api, f"overhead-{i}")
            medhive_times.append(elapsed)
            phases.append(phases_ms(job))
            docker_times.append(await docker_run(reference))
            progress(
                f"run {i + 1}/{n}: medhive {medhive_times[-1]:.3f} s, "
                f"docker run {docker_times[-1]:.3f} s"
            )
    keys = sorted({key for p in phases for key in p})
    medians = ("medhive_median_s", "docker_run_median_s", "ratio")
    return {
        **_medians_and_ratio(medians, medhive_times, docker_times, digits=4),
        "n": n,
        "rss_mb": rss,
        "medhive_min_max_s": [round(min(medhive_times), 4), round(max(medhive_times), 4)],
        "docker_run_min_max_s": [round(min(docker_times), 4), round(max(docker_times), 4)],
        "phases_median_ms": {
            key: round(statistics.median(p[key] for p in phases if key in p), 1) for key in keys
        },
    }


#: The job of the throughput mode: it asks for one cpu.
PARALLEL_SPEC = {"image": IMAGE, "command": ["true"], "resources": {"cpus": 1}}


async def medhive_batch(stack: Stack, api: Client, n: int, prefix: str) -> float:
    """Seconds from the first submit until all n jobs (`PARALLEL_SPEC`) have ended."""
    async with stack.client(stack.operator_token) as operator:
        stream = operator.stream({}, after=await audit_head(operator))
        started = time.perf_counter()
        spec = PARALLEL_SPEC
        submitting = asyncio.create_task(submit_all(api, n, prefix, spec))
        ended: dict[str, str] = {}
        try:
            async for record in stream:
                if record["type"] in ENDS:
                    ended[record["job_id"]] = record["type"]
                if submitting.done() and set(ids := submitting.result()) <= ended.keys():
                    break
        finally:
            submitting.cancel()
            await stream.aclose()
    elapsed = time.perf_counter() - started
    if failed := [job_id for job_id in ids if ended[job_id] != "job.succeeded"]:
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[0]}")
    return elapsed


def confined_run(spec: dict[str, Any]) -> list[str]:
    """`docker run --rm` of a job of `spec` in the confinement the node agent gives it
    (`container_config`, as a node with default settings makes it), in the CLI's flags:
    what the engine itself costs for that confinement. Less the labels and the job's own
    directories (its /outputs is a tmpfs the agent mounts on the host)."""
    job = JobSpec.model_validate({"name": "bench", **spec})
    run = NodeRun(
        job_id="bench", attempt=1, tenant="bench", spec=job, deadline=utcnow() + timedelta(hours=1)
    )
    config = container_config(run, NodeSettings(node_id="bench"))
    host = config["HostConfig"]
    argv = [
        "docker", "run", "--rm", "--network", host["NetworkMode"], "--user", config["User"],
        "--read-only", "--ipc", host["IpcMode"], "--pids-limit", str(host["PidsLimit"]),
        "--memory", f"{host['Memory']}b", "--memory-swap", f"{host['MemorySwap']}b",
        "--cpus", str(host["NanoCpus"] / 1e9), "--stop-timeout", str(config["StopTimeout"]),
        "--log-driver", host["LogConfig"]["Type"],
    ]  # fmt: skip
    argv += ["--init"] if host["Init"] else []
    argv += [f"--cap-drop={cap}" for cap in host["CapDrop"]]
    argv += [f"--security-opt={option}" for option in host["SecurityOpt"]]
    argv += [f"--log-opt={key}={value}" for key, value in host["LogConfig"]["Config"].items()]
    argv += [f"--tmpfs={path}:{options}" for path, options in host["Tmpfs"].items()]
    return [*argv, config["Image"], *config["Cmd"]]


async def docker_batch(n: int, parallel: int, reference: list[str] = DOCKER_RUN) -> float:
    """Seconds for n runs of `reference`, at most `parallel` at a time."""
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            await docker_run(reference)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - started


#: Processes both sides may use, by name: the container engine's daemons, and RabbitMQ
#: (which only medhive's side uses).
SHARED_PROCESSES = {"dockerd": "dockerd", "containerd": "containerd", "rabbitmq": RABBITMQ_PROCESS}


def _shared_cpu_s() -> dict[str, float]:
    """CPU seconds so far of the processes both sides may use (`SHARED_PROCESSES`), and
    of this bench's finished child processes (`cli`: the `docker run` CLIs of the
    references; a medhive round starts none)."""
    used = {key: named_cpu_s(name) for key, name in SHARED_PROCESSES.items()}
    times = os.times()
    used["cli"] = times.children_user + times.children_system
    return used


def _cpu_ms_per_job(
    before: dict[str, float], after: dict[str, float], jobs: int
) -> dict[str, float]:
    return {name: round((after[name] - before[name]) * 1000 / jobs, 1) for name in before}


async def parallel_bench(stack: Stack, jobs: int, parallel: int, rounds: int) -> dict[str, Any]:
    medhive_rates: list[float] = []
    docker_rates: list[float] = []
    medhive_cpu: list[dict[str, float]] = []
    medhive_db: list[dict[str, float]] = []
    docker_cpu: list[dict[str, float]] = []
    confined = confined_run(PARALLEL_SPEC)
    confined_rates: list[float] = []
    confined_cpu: list[dict[str, float]] = []
    async with stack.client() as api:
        await medhive_batch(stack, api, parallel, "warmup")
        await docker_batch(parallel, parallel)
        await docker_batch(parallel, parallel, confined)
        for i in range(rounds):
            stack.check_alive()
            before = {**stack.cpu_s(), **_shared_cpu_s()}
            ops_before = await db_ops(stack.mongo_url)
            medhive_rates.append(jobs / await medhive_batch(stack, api, jobs, f"round{i}"))
            medhive_cpu.append(_cpu_ms_per_job(before, {**stack.cpu_s(), **_shared_cpu_s()}, jobs))
            ops_after = await db_ops(stack.mongo_url)
            medhive_db.append(
                {kind: (ops_after[kind] - ops_before[kind]) / jobs for kind in DB_OPS}
            )
            before = {"machine": machine_busy_s(), **_shared_cpu_s()}
            docker_rates.append(jobs / await docker_batch(jobs, parallel))
            docker_cpu.append(
                _cpu_ms_per_job(before, {"machine": machine_busy_s(), **_shared_cpu_s()}, jobs)
            )
            before = {"machine": machine_busy_s(), **_shared_cpu_s()}
            confined_rates.append(jobs / await docker_batch(jobs, parallel, confined))
            confined_cpu.append(
                _cpu_ms_per_job(before, {"machine": machine_busy_s(), **_shared_cpu_s()}, jobs)
            )
            progress(
                f"round {i + 1}/{rounds}: medhive {medhive_rates[-1]:.2f}/s, "
                f"docker run {docker_rates[-1]:.2f}/s, confined {confined_rates[-1]:.2f}/s"
            )
    medians = ("medhive_per_s", "docker_per_s", "parallel_ratio")
    confined_medians = ("medhive_per_s", "docker_confined_per_s", "confined_ratio")
    return {
        **_medians_and_ratio(medians, medhive_rates, docker_rates, digits=2),
        **_medians_and_ratio(confined_medians, medhive_rates, confined_rates, digits=2),
        "jobs": jobs,
        "parallel": parallel,
        "rounds": rounds,
        "medhive_rounds_per_s": [round(rate, 2) for rate in medhive_rates],
        "docker_rounds_per_s": [round(rate, 2) for rate in docker_rates],
        # CPU milliseconds per job, medians over the rounds: each process of the stack,
        # the engine's daemons, RabbitMQ, the docker CLI runs (`cli`) and the whole
        # machine, which counts all of them.
        "medhive_cpu_ms_per_job": _medians(medhive_cpu),
        "docker_cpu_ms_per_job": _medians(docker_cpu),
        "docker_confined_cpu_ms_per_job": _medians(confined_cpu),
        # Database operations per job (`serverStatus` opcounters around each medhive
        # round, the bench's own audit stream included), medians over the rounds.
        "medhive_db_ops_per_job": _medians(medhive_db),
    }


def _medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(value, 1) for name, value in median_of(rounds).items()}


async def main(
    n: int, runtime: str = "docker", constraints: list[str] | None = None
) -> dict[str, Any]:
    # Settings as a small real installation would have them (the node's own capacity).
    node_env = {"MEDHIVE_VMNODE_RUNTIME": runtime}
    if constraints:
        node_env["MEDHIVE_VMNODE_SWARM_CONSTRAINTS"] = json.dumps(constraints)
    async with bench_stack(nodes=1, node_env=node_env) as stack:
        reference = swarm_run(constraints or []) if runtime == "swarm" else DOCKER_RUN
        return await bench(stack, n, reference)


async def main_parallel(jobs: int, parallel: int, rounds: int) -> dict[str, Any]:
    node_env = {"MEDHIVE_VMNODE_RUNTIME": "docker", "MEDHIVE_VMNODE_CPUS": str(parallel)}
    async with bench_stack(nodes=1, node_env=node_env) as stack:
        return await parallel_bench(stack, jobs, parallel, rounds)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=15, help="measured runs of each (default 15)")
    parser.add_argument("--parallel", type=int, default=0, help="throughput mode: P at a time")
    parser.add_argument("--jobs", type=int, default=100, help="jobs per round (throughput mode)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (throughput mode)")
    parser.add_argument(
        "--runtime", choices=["docker", "swarm"], default="docker",
        help="the node agent's runtime; swarm's reference is a replicated-job service",
    )  # fmt: skip
    parser.add_argument(
        "--swarm-constraint", action="append", default=[], metavar="EXPR",
        help="(swarm) run the jobs, and the reference, on the Swarm nodes this names "
        "(e.g. node.labels.medhive.test-worker==1 with scripts/swarm-worker.sh started)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.n < 1 or args.parallel < 0 or args.jobs < 1 or args.rounds < 1:
        parser.error("--n, --jobs and --rounds must be at least 1")
    if args.parallel:
        result = asyncio.run(main_parallel(args.jobs, args.parallel, args.rounds))
    else:
        result = asyncio.run(main(args.n, args.runtime, args.swarm_constraint))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli()
