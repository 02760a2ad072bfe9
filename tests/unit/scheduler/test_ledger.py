"""The placement ledger's per-node totals follow the jobs that hold room: a job placed,
moved to another node by a retry, and ended changes its node's total and no other, and
a node whose jobs all ended has its whole room again, to the last bit."""

from __future__ import annotations

import random
from typing import Any, cast

from services.scheduler.documents import JobDocument
from services.scheduler.placement import Held, PlacementView, Room


def job(
    job_id: str,
    rev: int,
    state: str,
    node: str | None,
    cpus: float,
    attempt: int = 1,
    tenant: str = "t1",
) -> JobDocument:
    doc: dict[str, Any] = {
        "_id": job_id,
        "rev": rev,
        "state": state,
        "tenant": tenant,
        "attempt": attempt,
        "spec": {"kind": "container", "resources": {"cpus": cpus, "memory_mb": 100}},
    }
    if node is not None:
        doc["node_id"] = node
    return cast(JobDocument, doc)


def summed(view: PlacementView) -> dict[str, Room]:
    used: dict[str, Room] = {}
    for placed in view.holding.values():
        room = used.get(placed.node_id, Room(0.0, 0))
        used[placed.node_id] = Room(room.cpus + placed.need.cpus, room.memory_mb + 100)
    return used


def test_totals_follow_placements_moves_and_ends() -> None:
    view = PlacementView()
    view.observe(job("a", 0, "queued", None, 0.1))
    assert view.in_use() == {}
    view.observe(job("a", 1, "dispatched", "n1", 0.1))
    view.observe(job("b", 0, "dispatched", "n1", 0.2))
    assert view.in_use() == {"n1": Room(0.3, 200)}
    view.observe(job("a", 2, "running", "n1", 0.1))  # the same placement, seen again
    assert view.in_use() == {"n1": Room(0.3, 200)}
    view.observe(job("a", 3, "dispatched", "n2", 0.1, attempt=2))  # retried elsewhere
    assert view.in_use() == {"n1": Room(0.2, 100), "n2": Room(0.1, 100)}
    view.observe(job("b", 1, "succeeded", "n1", 0.2))
    assert view.in_use() == {"n2": Room(0.1, 100)}
    view.observe(job("a", 2, "succeeded", "n1", 0.1))  # older than what was seen: ignored
    assert view.in_use() == {"n2": Room(0.1, 100)}
    view.observe(job("a", 4, "failed", "n2", 0.1, attempt=2))
    assert view.in_use() == {}


def test_many_fractional_jobs_leave_no_rounding_behind() -> None:
    view = PlacementView()
    rng = random.Random(7)
    live: dict[str, int] = {}
    for i in range(5000):
        job_id = f"j{i}"
        view.observe(
            job(job_id, 0, "dispatched", rng.choice(["n1", "n2"]), rng.choice([0.1, 0.3, 0.7]))
        )
        live[job_id] = 0
        if len(live) > 40:  # end the oldest
            gone = next(iter(live))
            del live[gone]
            view.observe(job(gone, 1, "succeeded", None, 0.1))
        used = view.in_use()
        assert used.keys() == summed(view).keys()
        for node, room in summed(view).items():
            assert (
                abs(used[node].cpus - room.cpus) < 1e-9 and used[node].memory_mb == room.memory_mb
            )
    for job_id in list(live):
        view.observe(job(job_id, 1, "succeeded", None, 0.1))
    assert view.in_use() == {}
    assert len(view.holding) == 0


def test_each_tenants_total_follows_its_own_jobs() -> None:
    view = PlacementView()
    view.observe(job("a", 0, "dispatched", "n1", 0.1, tenant="radiology"))
    view.observe(job("b", 0, "dispatched", "n2", 0.1, tenant="radiology"))
    view.observe(job("c", 0, "running", "n1", 0.1, tenant="radiology"))
    view.observe(job("d", 0, "dispatched", "n1", 2.0, tenant="oncology"))
    radiology = view.holding.held_by("radiology")
    assert (radiology.jobs, radiology.cpus, radiology.memory_mb) == (3, 0.3, 300)
    assert view.holding.held_by("oncology").jobs == 1
    view.observe(job("a", 1, "succeeded", "n1", 0.1, tenant="radiology"))
    view.observe(job("d", 1, "failed", "n1", 2.0, tenant="oncology"))
    radiology = view.holding.held_by("radiology")
    assert (radiology.jobs, radiology.cpus, radiology.memory_mb) == (2, 0.2, 200)
    assert view.holding.held_by("oncology") == Held()
