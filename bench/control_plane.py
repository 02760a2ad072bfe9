"""Control-plane throughput: many jobs at once, from submit to a stored audit record.

`python -m bench.control_plane [--jobs 600] [--nodes 2] [--tenants 1] [--rounds 3]`

The node agents run the `instant` runtime (every workload ends at once with exit 0)
and offer a huge capacity, so what is measured is medhive itself: the job API, the
scheduler's store, placement and outbox, RabbitMQ, the agents' handling of `node.run`
and their reports, and the audit recorder. M jobs are submitted at once over HTTP
(at most 64 requests in flight on one session). The run ends when both
`GET /v1/jobs?state=succeeded` lists all M jobs and the audit store has the
`job.succeeded` record of each (followed on the audit's SSE stream with an operator
token, so that the bench's own reads cost the database next to nothing; see
`run_jobs`).

Target: `jobs_per_s` >= 300 on a 2-core machine (everything here, this bench included,
shares the two cores).

The reference, measured in the same run against the same database server:
`db_ceiling_jobs_per_s`, how many jobs per second that server can store when storing
is all there is (see `db_ceiling`): no implementation of this design can go faster
on it, and `of_ceiling` is the share of it that medhive reaches.

The peer, measured in the same run on the same broker and database server:
`reference_celery_per_s`, Celery with its MongoDB result backend and
`task_track_started=True` (see `bench/celery_reference.py`), and `of_celery`, jobs_per_s
over it. The machine is shared and noisy (one run to the next, either side moved by a
tenth): the M jobs are measured `--rounds` times, each round followed by Celery's, and
the rates are the medians of the rounds; so are the CPU and database counts per job.

The last line of stdout is one JSON object:
- `jobs_per_s`: M / (end - first submit), the median round (`jobs_per_s_rounds`,
  `reference_celery_per_s_rounds`: every round's);
- `steady_p99_dispatch_ms` (and p50): submit → dispatched under a steady offered load
  of 50 jobs/s for `--steady-s` seconds (each job submitted in its own time slot);
- `reference_celery_per_s`, `of_celery`: above; `reference_celery_cpu_ms_per_task`, what
  Celery's batch cost per task by process (the worker, the database server, RabbitMQ,
  this process sending, `machine` and `other`): read beside `cpu_ms_per_job`, it says
  which part of the gap is each dependency's and which is medhive's own;
- `db_ops_per_job` (inserts, queries, updates, deletes, getmores; `serverStatus`
  opcounters from the first submit to the end, per job) and `db_ops_per_job_by_kind`;
  `broker_messages_per_job` (published into and delivered from the run's vhost, from
  the management API, around the first round); `cpu_ms_per_job` per process;
- `p50_dispatch_ms`, `p99_dispatch_ms`: per job of the first round, from its
  `submitted` history entry to its `dispatched` one (the scheduler's own clock);
- `events_per_s`: audit records stored during the run (counted with `GET /v1/events`:
  every record after the last one stored before the first submit, up to the end)
  per second of the run;
- `db_ceiling_jobs_per_s`, `of_ceiling`: the reference above, and jobs_per_s over it;
  `db_ceiling_audit_records_per_s`, the audit inserts of that reference timed alone,
  and `audit_records_per_job` in this run;
- `placement_pass_cpu_ms` (and `_by_case`): CPU of one placement decision with 100,000
  jobs queued over 20 tenants, in this process (`placement_pass_cpu_ms`); target < 50;
- `jobs`, `tenants` (`--tenants N`: job i is submitted by tenant i mod N), `nodes`,
  `rss_mb` (idle RSS of each service process before any job; `vmnode`
  is the largest agent);
- for diagnosis: `duration_s`, `submit_s` (until every POST was answered) and
  `audit_records` of the median round, `p50/p99_end_to_end_ms` (submitted -> succeeded,
  from the history, first round) and `cpu_s` (CPU seconds each process used during a
  round, medians; `rabbitmq` is the broker, `other` the rest of the machine's busy time).

One module because it is one run whose numbers are only meaningful together: every phase
uses the same stack, in an order that keeps one from loading the database the next
measures, and the references (`db_ceiling`, which copies a job of the measured run;
Celery on the same broker and database server) exist to be divided into `jobs_per_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pymongo import AsyncMongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase

from bench.celery_reference import celery_per_s
from bench.stack import Stack, _vhost, bench_stack, cpu_used, progress, rabbit_get
from medhive.client import Client
from services.audit.store import AuditStore, RecordQuery
from services.scheduler.documents import JobCommand, JobDocument
from services.scheduler.nodes import NodeStore
from services.scheduler.placement import Placer, Room
from services.scheduler.store import JobStore
from services.scheduler.tenants import TenantBook
from shared.mongo import Document

IMAGE = "medhive/busybox:1"
IN_FLIGHT = 64
WARMUP_JOBS = 20
EVENTS_PAGE = 1000
CEILING_JOBS = 300
CEILING_BATCH = 100
LATER_STATES = 3  # dispatched, running, succeeded: the transitions after the insert
CELERY_TASKS = 2000
#: Measured runs, each followed by Celery's: the rates reported are the medians.
ROUNDS = 3
#: The offered load of the steady phase, jobs per second.
STEADY_RATE = 50.0
#: The operations counted in `db_ops_per_job` (commands such as index builds and
#: `serverStatus` itself are not a job's cost).
DB_OPS = ("insert", "query", "update", "delete", "getmore")
#: The placement pass measured in-process: this many jobs waiting, of these tenants, in
#: these shapes (cpus, MiB; the last fits no node), round-robin.
PASS_QUEUED = 100_000
PASS_TENANTS = 20
PASS_SHAPES = [(1.0, 256), (2.0, 1024), (4.0, 4096), (0.5, 128), (64.0, 256)]
#: How long the management API may take to count a message (its statistics interval).
BROKER_STATS_LAG_S = 6.0


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass
class Run:
    ids: list[str]
    started: float  # perf_counter just before the first submit
    submitted: float  # every submit answered
    ended: float  # every job succeeded and its job.succeeded record stored
    records: int  # audit records stored during the run
    seq_before: int  # the audit's last record before the first submit


async def audit_head(operator: Client) -> int:
    """The `seq` of the newest stored audit record (0 if none)."""
    after = 0
    while True:
        events, next_after = await operator.events({}, after=after)
        if events:
            after = events[-1]["seq"]
        if next_after is None:
            return after


async def succeeded_ids(api: Client | list[Client]) -> set[str]:
    """Every job `GET /v1/jobs?state=succeeded` lists, page by page (`before`), for
    each tenant's client."""
    found: set[str] = set()
    for client in api if isinstance(api, list) else [api]:
        params: dict[str, str | int] = {"state": "succeeded", "limit": 500}
        while True:
            body = await client.call("GET", f"{client.api_url}/v1/jobs", params=params)
            found.update(job["id"] for job in body["jobs"])
            if body["next_before"] is None:
                break
            params["before"] = body["next_before"]
    return found


async def recorded_succeeded(operator: Client, after: int) -> set[str]:
    """Jobs with a `job.succeeded` record after `after`: `GET /v1/events?type=...`."""
    found: set[str] = set()
    while True:
        events, next_after = await operator.events({"type": "job.succeeded"}, after=after)
        found.update(event["job_id"] for event in events)
        if next_after is None:
            return found
        after = next_after


async def submit_all(
    api: Client | list[Client], m: int, prefix: str, spec: dict[str, Any] | None = None
) -> list[str]:
    """Submit m jobs concurrently (`spec`, named `<prefix>-<i>`), at most IN_FLIGHT
    requests at a time; given several clients (tenants), job i goes to client i mod N."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    spec = spec or {"image": IMAGE, "command": ["true"]}
    clients = api if isinstance(api, list) else [api]

    async def one(i: int) -> str:
        async with gate:
            job = await clients[i % len(clients)].submit({**spec, "name": f"{prefix}-{i}"})
        return str(job["id"])

    return list(await asyncio.gather(*(one(i) for i in range(m))))


async def run_jobs(
    stack: Stack,
    api: Client | list[Client],
    operator: Client,
    m: int,
    prefix: str,
    at_start: Callable[[], Awaitable[None]] | None = None,
    at_end: Callable[[], Awaitable[None]] | None = None,
) -> Run:
    """Submit m jobs at once; return once all succeeded and their audit is stored.

    The audit is followed on its SSE stream from the last record stored before the
    first submit, each record once, and the `job.succeeded` ones are picked out here: a
    stream costs the database a query when records arrive, where polling would cost
    one every few milliseconds and count as the system's own load. The moment the last
    `job.succeeded` is seen is the end: the scheduler stores a state before it
    publishes the event (outbox), so the job list agrees by then. `at_start` and
    `at_end` run just before the first submit and just at the end (counters are read
    there); then both results are checked as stated, with
    `GET /v1/jobs?state=succeeded` and `GET /v1/events?type=job.succeeded`.
    """
    seq_before = await audit_head(operator)
    recorded: set[str] = set()
    records = 0
    stream = operator.stream({}, after=seq_before)
    if at_start is not None:
        await at_start()
    started = time.perf_counter()
    answered: list[float] = []

    async def submit() -> list[str]:
        ids = await submit_all(api, m, prefix)
        answered.append(time.perf_counter())
        progress(f"{m} jobs submitted in {answered[0] - started:.2f} s")
        return ids

    submitting = asyncio.create_task(submit())
    last_report = started
    try:
        async for record in stream:
            records += 1
            if record["type"] == "job.succeeded":
                recorded.add(record["job_id"])
            if submitting.done() and recorded.issuperset(ids := submitting.result()):
                ended = time.perf_counter()
                break
            if (now := time.perf_counter()) - last_report >= 2:
                last_report = now
                progress(f"{len(recorded)}/{m} job.succeeded recorded after {now - started:.1f} s")
                stack.check_alive()
    finally:
        submitting.cancel()  # only still running when the wait was given up
        await stream.aclose()
    if at_end is not None:
        await at_end()
    listed = await succeeded_ids(api)
    if not listed.issuperset(ids):
        raise RuntimeError(f"{len(set(ids) - listed)} jobs recorded but not listed as succeeded")
    if not (await recorded_succeeded(operator, seq_before)).issuperset(ids):
        raise RuntimeError("GET /v1/events?type=job.succeeded misses records seen unfiltered")
    return Run(ids, started, answered[0], ended, records, seq_before)


async def histories(api: Client | list[Client], ids: list[str]) -> list[dict[str, datetime]]:
    """Each job's first time in each state, from `GET /v1/jobs/{id}` (job i read with
    client i mod N, the tenant `submit_all` gave it to)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    clients = api if isinstance(api, list) else [api]

    async def one(i: int, job_id: str) -> dict[str, datetime]:
        async with gate:
            job = await clients[i % len(clients)].job(job_id)
        at: dict[str, datetime] = {}
        for entry in job["history"]:
            at.setdefault(entry["state"], datetime.fromisoformat(entry["at"]))
        return at

    return list(await asyncio.gather(*(one(i, job_id) for i, job_id in enumerate(ids))))


@dataclass
class Ceiling:
    jobs_per_s: float  # every write a job needs
    records_per_s: float  # the audit records alone


async def db_ceiling(stack: Stack, sample_job_id: str) -> Ceiling:
    """Jobs per second the database server could store if storing were all a job cost.

    The reference for `jobs_per_s`: for CEILING_JOBS jobs, only the writes that this
    design cannot do without, in their cheapest form and with nothing else running:
    each job inserted, its three later transitions stored, and its audit records
    inserted, all in batches of CEILING_BATCH jobs. The documents are copies (new ids)
    of a job of this run and of its audit records, so sizes are the real ones, and the
    collections get the services' own indexes. No broker, no service, no wait: no
    implementation of this design goes faster on this database server. The audit
    inserts are also timed alone (`records_per_s`): every design that records every
    event needs at least that many records per job, whatever it does with the rest.
    """
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.mongo_url)
    try:
        source_jobs = client[f"{stack.db_prefix}_scheduler"]["jobs"]
        job = await source_jobs.find_one({"_id": sample_job_id})
        source_audit = AuditStore(client[f"{stack.db_prefix}_audit"])
        records = await source_audit.page(RecordQuery(job=sample_job_id), after=0, limit=1000)
        assert job is not None and records, "the sample job and its records are stored"
        later = job["history"][-LATER_STATES:]
        first = {**job, "history": job["history"][:-LATER_STATES], "state": "queued"}
        target = client[f"{stack.db_prefix}_ceiling"]
        jobs, audit = JobStore(target), AuditStore(target)
        await jobs.create_indexes()
        await audit.ensure_indexes()
        seq = 0
        auditing = 0.0
        started = time.perf_counter()
        for batch in range(CEILING_JOBS // CEILING_BATCH):
            ids = [f"ceiling-{batch}-{i}" for i in range(CEILING_BATCH)]
            job_copies = []
            for job_id in ids:  # each job the answer to a command of its own
                command = JobCommand(id=job_id, sender=first["command"]["sender"])
                job_copies.append({**first, "_id": job_id, "command": command})
            await jobs.jobs.insert_many(job_copies)
            for entry in later:
                await jobs.jobs.bulk_write(
                    [
                        UpdateOne(
                            {"_id": job_id},
                            {"$set": {"state": entry["state"]}, "$push": {"history": entry}},
                        )
                        for job_id in ids
                    ],
                    ordered=False,
                )
            copies = []
            for job_id in ids:
                for record in records:
                    seq += 1
                    copies.append({**record, "_id": f"{job_id}-{seq}", "seq": seq})
            audit_started = time.perf_counter()
            await audit.insert(copies)
            auditing += time.perf_counter() - audit_started
        elapsed = time.perf_counter() - started
        return Ceiling(CEILING_JOBS / elapsed, CEILING_JOBS * len(records) / auditing)
    finally:
        await client.close()


async def db_ops(mongo_url: str) -> dict[str, int]:
    """The database server's operation counters (`serverStatus.opcounters`)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url)
    try:
        status = await client.admin.command("serverStatus")
        return {name: int(count) for name, count in status["opcounters"].items()}
    finally:
        await client.close()


async def broker_messages(vhost: str) -> dict[str, int]:
    """Messages published into and delivered from the vhost, by the management API,
    once its statistics have caught up (it aggregates them every few seconds)."""
    await asyncio.sleep(BROKER_STATS_LAG_S)
    stats = (await rabbit_get(f"/vhosts/{vhost}")).get("message_stats", {})
    return {"published": int(stats.get("publish", 0)),
            "delivered": int(stats.get("deliver_get", 0))}  # fmt: skip


def per_job(before: dict[str, int], after: dict[str, int], m: int) -> dict[str, float]:
    return {name: round((after[name] - before.get(name, 0)) / m, 2) for name in after}


async def steady_dispatch_ms(
    stack: Stack, api: Client, operator: Client, rate: float, seconds: float, timeout_s: float
) -> list[float]:
    """Submit → dispatched of each job under a steady offered load: `rate` jobs per
    second for `seconds`, each submitted on its own schedule (not when the previous
    one was answered), followed to the end on the audit's stream."""
    count = round(rate * seconds)
    stream = operator.stream({}, after=await audit_head(operator))
    gate = asyncio.Semaphore(IN_FLIGHT)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int) -> str:
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))  # its time slot
        async with gate:
            job = await api.submit({"name": f"steady-{i}", "image": IMAGE, "command": ["true"]})
        return str(job["id"])

    submitting = asyncio.gather(*(one(i) for i in range(count)))
    done: set[str] = set()
    try:
        async with asyncio.timeout(timeout_s):
            async for record in stream:
                if record["type"] == "job.succeeded":
                    done.add(record["job_id"])
                if submitting.done() and done.issuperset(ids := submitting.result()):
                    break
    finally:
        submitting.cancel()
        await stream.aclose()
    return [ms(at["submitted"], at["dispatched"]) for at in await histories(api, ids)]


def ms(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds() * 1000


def placement_pass_cpu_ms(queued: int = PASS_QUEUED) -> dict[str, float]:
    """Scheduler CPU (ms) of one placement decision (`Placer.decide`, what a pass does
    between reading the nodes and sending the dispatches) with `queued` jobs waiting:
    when ten nodes have room for a whole batch, and when none has room for anything.
    In this process, on the scheduler's own code; no database is touched."""
    unused: AsyncDatabase[Document] = AsyncMongoClient("mongodb://127.0.0.1:1/", connect=False)[
        "unused"
    ]
    placer = Placer(JobStore(unused), NodeStore(unused), 20.0, TenantBook(unused, 86400.0, 4096))
    for i in range(queued):
        cpus, memory_mb = PASS_SHAPES[i % len(PASS_SHAPES)]
        resources = {"cpus": cpus, "memory_mb": memory_mb}
        # Only the fields placement reads: a whole job would measure its copying too.
        queued_job = {"_id": f"j-{i:09d}", "tenant": f"t{i % PASS_TENANTS}", "state": "queued",
                      "rev": 0, "priority": i % 3, "spec": {"resources": resources}}  # fmt: skip
        placer.view.observe(cast(JobDocument, queued_job))
    nodes = [f"n{k}" for k in range(10)]
    runtimes = {node: ["container"] for node in nodes}
    cases = {
        "no_room": {node: Room(0.25, 64) for node in nodes},
        "room_for_a_batch": {node: Room(1000.0, 10_000_000) for node in nodes},
    }
    cpu_ms = {}
    for name, free in cases.items():
        started = time.process_time()
        chosen = placer.decide(dict(free), runtimes)
        cpu_ms[name] = round((time.process_time() - started) * 1000, 2)
        progress(f"placement pass, {queued} queued, {name}: {len(chosen)} decided in "
                 f"{cpu_ms[name]} ms CPU")  # fmt: skip
    return cpu_ms


async def _measured(
    stack: Stack, api: list[Client], operator: Client, m: int, prefix: str, timeout_s: float
) -> tuple[Run, dict[str, float], dict[str, float]]:
    """One measured run of m jobs: the run, the CPU seconds each process used and the
    database operations per job, both counted from the first submit to the end."""
    counted: dict[str, dict[str, Any]] = {}

    async def at_start() -> None:
        counted["cpu"], counted["db"] = stack.cpu_s(), await db_ops(stack.mongo_url)

    async def at_end() -> None:
        counted["cpu_after"] = stack.cpu_s()
        counted["db_after"] = await db_ops(stack.mongo_url)

    try:
        async with asyncio.timeout(timeout_s):
            run = await run_jobs(stack, api, operator, m, prefix, at_start, at_end)
    except TimeoutError:
        listed = await succeeded_ids(api)
        raise SystemExit(
            f"not done within {timeout_s} s: {len(listed)} jobs succeeded in all"
        ) from None
    cpu = cpu_used(counted["cpu"], counted["cpu_after"])
    progress(f"{m} done in {run.ended - run.started:.2f} s; CPU seconds used: {cpu}")
    return run, cpu, per_job(counted["db"], counted["db_after"], m)


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over the rounds."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


async def bench(
    stack: Stack, m: int, timeout_s: float, steady_s: float, rounds: int = ROUNDS
) -> dict[str, Any]:
    rss = stack.rss_mb()
    progress(f"idle RSS (MiB): {rss}")
    async with contextlib.AsyncExitStack() as clients:
        api = [await clients.enter_async_context(stack.client(t)) for t in stack.user_tokens]
        operator = await clients.enter_async_context(stack.client(stack.operator_token))
        warm = min(WARMUP_JOBS, m)
        progress(f"warm-up: {warm} jobs")
        async with asyncio.timeout(timeout_s):
            await run_jobs(stack, api, operator, warm, "warmup")
        messages_before = await broker_messages(stack.vhost)
        runs: list[Run] = []
        cpu_rounds: list[dict[str, float]] = []
        ops_rounds: list[dict[str, float]] = []
        celery_rounds: list[float] = []
        celery_cpu_rounds: list[dict[str, float]] = []
        # One vhost for Celery's rounds: the app keeps its connection from one to the next.
        async with _vhost(f"{stack.vhost}-celery") as celery_amqp:
            for i in range(rounds):
                progress(f"round {i + 1}/{rounds}: {m} jobs on {len(stack.node_ids)} node(s)")
                run, cpu, ops = await _measured(stack, api, operator, m, f"cp{i}", timeout_s)
                runs.append(run)
                cpu_rounds.append(cpu)
                ops_rounds.append(ops)
                if i == 0:  # the counts do not vary: the first round's are the figures
                    messages = per_job(messages_before, await broker_messages(stack.vhost), m)
                    times = await histories(api, run.ids)
                reference = await celery_per_s(
                    celery_amqp, stack.mongo_url, CELERY_TASKS, stack.workdir,
                    watched={"db": stack.processes["db"].pid},
                )  # fmt: skip
                celery_rounds.append(reference.per_s)
                celery_cpu_rounds.append(reference.cpu_ms_per_task)
                progress(
                    f"round {i + 1}/{rounds}: medhive {m / (run.ended - run.started):.1f} "
                    f"jobs/s, Celery {celery_rounds[-1]:.1f} tasks/s"
                )

    progress(f"reference: {CEILING_JOBS} jobs' writes straight to the database")
    ceiling = await db_ceiling(stack, runs[0].ids[0])
    # Last: its jobs would load the database the references measure.
    steady: list[float] = []
    if steady_s > 0:
        progress(f"steady load: {STEADY_RATE:.0f} jobs/s for {steady_s:.0f} s")
        async with stack.client() as steady_api, stack.client(stack.operator_token) as operator:
            steady = await steady_dispatch_ms(
                stack, steady_api, operator, STEADY_RATE, steady_s, timeout_s
            )
    pass_cpu = placement_pass_cpu_ms()
    dispatch = [ms(at["submitted"], at["dispatched"]) for at in times]
    end_to_end = [ms(at["submitted"], at["succeeded"]) for at in times]
    rates = [m / (run.ended - run.started) for run in runs]
    median_run = sorted(runs, key=lambda run: run.ended - run.started)[len(runs) // 2]
    duration = median_run.ended - median_run.started
    cpu = median_of(cpu_rounds)
    ops = median_of(ops_rounds)
    jobs_per_s, celery = statistics.median(rates), statistics.median(celery_rounds)
    return {
        "jobs_per_s": round(jobs_per_s, 1),
        "steady_p99_dispatch_ms": round(percentile(steady, 99), 1) if steady else None,
        "steady_p50_dispatch_ms": round(percentile(steady, 50), 1) if steady else None,
        "reference_celery_per_s": round(celery, 1),
        "of_celery": round(jobs_per_s / celery, 3),
        "rounds": rounds,
        "jobs_per_s_rounds": [round(rate, 1) for rate in rates],
        "reference_celery_per_s_rounds": [round(rate, 1) for rate in celery_rounds],
        "reference_celery_cpu_ms_per_task": {
            name: round(value, 2) for name, value in median_of(celery_cpu_rounds).items()
        },
        "db_ops_per_job": round(sum(ops[k] for k in DB_OPS), 2),
        "db_ops_per_job_by_kind": ops,
        "broker_messages_per_job": messages,
        "cpu_ms_per_job": {name: round(seconds / m * 1000, 2) for name, seconds in cpu.items()},
        "db_ceiling_jobs_per_s": round(ceiling.jobs_per_s, 1),
        "of_ceiling": round(jobs_per_s / ceiling.jobs_per_s, 2),
        "db_ceiling_audit_records_per_s": round(ceiling.records_per_s),
        "audit_records_per_job": round(median_run.records / m, 1),
        "p50_dispatch_ms": round(percentile(dispatch, 50), 1),
        "p99_dispatch_ms": round(percentile(dispatch, 99), 1),
        "events_per_s": round(median_run.records / duration, 1),
        "placement_pass_cpu_ms": max(pass_cpu.values()),
        "placement_pass_cpu_ms_by_case": pass_cpu,
        "jobs": m,
        "tenants": len(stack.user_tokens),
        "nodes": len(stack.node_ids),
        "rss_mb": rss,
        "duration_s": round(duration, 3),
        "submit_s": round(median_run.submitted - median_run.started, 3),
        "audit_records": median_run.records,
        "p50_end_to_end_ms": round(percentile(end_to_end, 50), 1),
        "p99_end_to_end_ms": round(percentile(end_to_end, 99), 1),
        "cpu_s": cpu,
    }


async def main(
    m: int,
    nodes: int,
    timeout_s: float,
    steady_s: float,
    tenants: int,
    schedulers: int = 1,
    rounds: int = ROUNDS,
) -> dict[str, Any]:
    node_env = {
        "MEDHIVE_VMNODE_RUNTIME": "instant",
        "MEDHIVE_VMNODE_CPUS": "10000",
        "MEDHIVE_VMNODE_MEMORY_MB": "10000000",
    }
    # A loaded scheduler may handle heartbeats late: never declare a node lost here.
    scheduler_env = {"MEDHIVE_SCHEDULER_NODE_TIMEOUT_S": "600"}
    async with bench_stack(
        nodes=nodes, node_env=node_env, scheduler_env=scheduler_env, tenants=tenants,
        schedulers=schedulers,
    ) as stack:  # fmt: skip
        return {**await bench(stack, m, timeout_s, steady_s, rounds), "schedulers": schedulers}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=600, help="jobs submitted at once (600)")
    parser.add_argument("--nodes", type=int, default=2, help="node agents (default 2)")
    parser.add_argument(
        "--tenants", type=int, default=1, help="tenants the jobs are spread over (default 1)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (600)")
    parser.add_argument(
        "--steady-s", type=float, default=30.0, help="seconds of steady load (30; 0: none)"
    )
    parser.add_argument(
        "--schedulers", type=int, default=1,
        help="schedulers (default 1); the others stand by, their CPU is reported",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS,
        help=f"measured runs, each followed by Celery's (default {ROUNDS}); medians reported",
    )  # fmt: skip
    args = parser.parse_args()
    if min(args.jobs, args.nodes, args.tenants, args.schedulers, args.rounds) < 1:
        parser.error("--jobs, --nodes, --tenants, --schedulers and --rounds must be at least 1")
    result = asyncio.run(
        main(
            args.jobs,
            args.nodes,
            args.timeout,
            args.steady_s,
            args.tenants,
            args.schedulers,
            args.rounds,
        )
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli()
