"""One watched attempt, and how the way it ended becomes its reported outcome."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from services.vmnode.runtimes.base import ExitInfo, Workload
from shared.messages.jobs import Resources
from shared.messages.nodes import RunFinished, RunOutcome


@dataclass(eq=False)
class Watch:
    """An attempt the agent is watching, and how it is going to end."""

    workload: Workload
    #: What the run asked for; None for one adopted from an earlier agent (the engine
    #: keeps no record of it), which `/metrics` then counts as running but not reserving.
    need: Resources | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    outcome: RunOutcome | None = None  # decided before the exit: timed_out, cancelled
    reason: str | None = None
    stopped_by: str | None = None  # id of the `node.cancel` that ended it, if one did
    #: Whether `run.started` went out from this agent (an adopted run may not know).
    announced: bool = False
    reported: bool = False
    task: asyncio.Task[None] | None = None

    def decide(self, outcome: RunOutcome, reason: str, stopped_by: str | None = None) -> None:
        """Fix the outcome (the first decision wins) and ask the watcher to stop."""
        if self.outcome is None:
            self.outcome, self.reason, self.stopped_by = outcome, reason, stopped_by
        self.stop_requested.set()


def run_finished(watch: Watch, info: ExitInfo | None, node_id: str) -> RunFinished:
    """The `run.finished` of an attempt: a decided outcome wins, then OOM, then the exit.

    `info` is None when the workload vanished (removed behind medhive's back).
    """
    outcome: RunOutcome
    reason = watch.reason
    if watch.outcome is not None:
        outcome = watch.outcome
    elif info is None:
        outcome = "failed"
        reason = "the workload disappeared from the node before it was reported"
    elif info.oom_killed:
        # Docker flags any OOM kill in the container; the results may be incomplete.
        outcome = "failed"
        limit = f"{info.memory_limit_mb} MiB" if info.memory_limit_mb else "unknown"
        reason = f"out of memory (limit {limit})"
    elif info.exit_code == 0:
        outcome = "succeeded"
    else:
        outcome = "failed"
        reason = f"exit code {info.exit_code}"
    return RunFinished(
        job_id=watch.workload.job_id,
        attempt=watch.workload.attempt,
        node_id=node_id,
        outcome=outcome,
        exit_code=info.exit_code if info is not None else None,
        oom_killed=info.oom_killed if info is not None else False,
        reason=reason,
    )
