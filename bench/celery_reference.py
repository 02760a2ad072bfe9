"""The control plane's reference: Celery on the same broker and database server.

Celery is the task queue hospitals' research groups know best. With its MongoDB result
backend and `task_track_started=True` it stores two states per task (STARTED, then
SUCCESS) and moves each task through RabbitMQ: the closest well-known peer of what
medhive does per job, on the same parts. `celery_per_s` sends N no-op tasks at once to
a worker with a pool of 8 threads and counts until the backend holds every SUCCESS.

This module is also the Celery app the worker imports (`celery -A bench.celery_reference
worker`): it reads the broker and the backend from `MEDHIVE_BENCH_CELERY_BROKER` and
`MEDHIVE_BENCH_CELERY_BACKEND`. Celery is a bench-only dependency (`.[bench]`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from pymongo import AsyncMongoClient

from bench.stack import cpu_snapshot, cpu_used, progress, start, stop
from medhive.processes import Child

DATABASE = "celery_reference"
COLLECTION = "celery_taskmeta"
THREADS = 8
POLL_S = 0.05

app = Celery("medhive_bench_reference")
app.conf.update(
    broker_url=os.environ.get("MEDHIVE_BENCH_CELERY_BROKER", "amqp://"),
    result_backend=os.environ.get("MEDHIVE_BENCH_CELERY_BACKEND", "mongodb://127.0.0.1/"),
    mongodb_backend_settings={"database": DATABASE, "taskmeta_collection": COLLECTION},
    task_track_started=True,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop() -> None:
    """A task that does nothing: what is measured is the queue around it."""


async def _successes(mongo_url: str) -> int:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        return await client[DATABASE][COLLECTION].count_documents({"status": "SUCCESS"})
    finally:
        await client.close()


async def _forget_results(mongo_url: str) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url)
    try:
        await client[DATABASE].drop_collection(COLLECTION)
    finally:
        await client.close()


async def _until_stored(mongo_url: str, count: int, worker: Child, within: float) -> None:
    """Poll the result backend until `count` tasks have their SUCCESS stored."""
    async with asyncio.timeout(within):
        while await _successes(mongo_url) < count:
            if worker.poll() is not None:
                raise RuntimeError(f"the Celery worker exited: see {worker.log}")
            await asyncio.sleep(POLL_S)


def _send(count: int) -> None:
    for _ in range(count):
        noop.apply_async()


@dataclass
class CeleryRun:
    """A measured batch: tasks per second, and the CPU milliseconds per task of the
    worker (`celery`), of the processes the caller named, of RabbitMQ, of this process
    (`bench`: the sending and the polling) and of the whole machine (`other`: the rest)."""

    per_s: float
    cpu_ms_per_task: dict[str, float]


async def celery_per_s(
    amqp_url: str,
    mongo_url: str,
    tasks: int,
    workdir: Path,
    within: float = 600,
    watched: Mapping[str, int] | None = None,
) -> CeleryRun:
    """Tasks per second, from the first send until every SUCCESS is stored, and what
    they cost (`watched`: more processes to count, name -> pid, e.g. the database's)."""
    env = {
        **os.environ,
        "MEDHIVE_BENCH_CELERY_BROKER": amqp_url,
        "MEDHIVE_BENCH_CELERY_BACKEND": mongo_url,
    }
    argv = [
        sys.executable, "-m", "celery", "-A", "bench.celery_reference", "worker",
        "--pool", "threads", "--concurrency", str(THREADS), "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    worker = start("celery", argv, env, workdir / "celery.log")
    counted = {"celery": worker.pid, **(watched or {})}
    try:
        app.conf.broker_url, app.conf.result_backend = amqp_url, mongo_url
        await _forget_results(mongo_url)  # an earlier round's: each starts as the first
        progress("Celery: warm-up task")
        await asyncio.to_thread(_send, 1)
        await _until_stored(mongo_url, 1, worker, within)
        progress(f"Celery: {tasks} no-op tasks")
        before, started = cpu_snapshot(counted), time.perf_counter()
        await asyncio.to_thread(_send, tasks)
        await _until_stored(mongo_url, tasks + 1, worker, within)
        elapsed, used = time.perf_counter() - started, cpu_used(before, cpu_snapshot(counted))
        cpu_ms = {name: round(seconds / tasks * 1000, 2) for name, seconds in used.items()}
        return CeleryRun(tasks / elapsed, cpu_ms)
    finally:
        await stop(worker)
