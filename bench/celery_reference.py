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
from pathlib import Path

from celery import Celery
from pymongo import AsyncMongoClient

from bench.stack import progress, start, stop
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


async def celery_per_s(
    amqp_url: str, mongo_url: str, tasks: int, workdir: Path, within: float = 600
) -> float:
    """Tasks per second, from the first send until every SUCCESS is stored."""
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
    try:
        app.conf.broker_url, app.conf.result_backend = amqp_url, mongo_url
        await _forget_results(mongo_url)  # an earlier round's: each starts as the first
        progress("Celery: warm-up task")
        await asyncio.to_thread(_send, 1)
        await _until_stored(mongo_url, 1, worker, within)
        progress(f"Celery: {tasks} no-op tasks")
        started = time.perf_counter()
        await asyncio.to_thread(_send, tasks)
        await _until_stored(mongo_url, tasks + 1, worker, within)
        return tasks / (time.perf_counter() - started)
    finally:
        await stop(worker)
