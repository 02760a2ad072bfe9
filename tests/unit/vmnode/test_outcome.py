"""How the way a workload ended becomes the outcome in `run.finished`."""

from __future__ import annotations

from datetime import UTC, datetime

from services.vmnode.runtimes.base import ExitInfo, Workload
from services.vmnode.watch import Watch, run_finished

WORKLOAD = Workload("c1", "job-1", 1, "t1", datetime(2030, 1, 1, tzinfo=UTC), "running")


def _finished(info: ExitInfo, watch: Watch | None = None) -> tuple[str, str | None]:
    result = run_finished(watch or Watch(WORKLOAD), info, "n1")
    assert (result.job_id, result.attempt, result.node_id) == ("job-1", 1, "n1")
    assert result.exit_code == info.exit_code and result.oom_killed == info.oom_killed
    return result.outcome, result.reason


def test_exit_code_decides_a_natural_end() -> None:
    assert _finished(ExitInfo(0, False)) == ("succeeded", None)
    assert _finished(ExitInfo(3, False)) == ("failed", "exit code 3")


def test_oom_kill_fails_with_the_limit() -> None:
    assert _finished(ExitInfo(137, True, 32)) == ("failed", "out of memory (limit 32 MiB)")


def test_first_decision_wins_over_the_exit() -> None:
    watch = Watch(WORKLOAD)
    watch.decide("cancelled", "user asked")
    watch.decide("timed_out", "walltime")
    assert watch.stop_requested.is_set()
    assert _finished(ExitInfo(143, False), watch) == ("cancelled", "user asked")
