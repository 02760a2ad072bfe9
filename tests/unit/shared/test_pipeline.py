"""A lane runs its steps one after the other in the order given, stops at the first
failure, and when stopped lets the step under way finish before it returns."""

from __future__ import annotations

import functools
import threading

import pytest

from shared.pipeline import Lane


def test_steps_run_in_the_order_given_in_one_thread() -> None:
    lane = Lane("test")
    done: list[tuple[int, str]] = []

    def step(i: int) -> None:
        done.append((i, threading.current_thread().name))

    steps = [lane.run(functools.partial(step, i)) for i in range(200)]
    for step in steps:
        step.result(timeout=30)
    assert [i for i, _ in done] == list(range(200))
    assert len({name for _, name in done}) == 1
    lane.stop()


def test_after_a_failed_step_the_later_ones_fail_without_running() -> None:
    lane = Lane("test")
    ran: list[int] = []

    def fails() -> None:
        raise OSError("disk full")

    first, second = lane.run(fails), lane.run(lambda: ran.append(2))
    with pytest.raises(OSError, match="disk full"):
        first.result(timeout=30)
    with pytest.raises(RuntimeError, match="before this one failed"):
        second.result(timeout=30)
    assert ran == []
    lane.stop()


def test_stop_waits_for_the_step_under_way_and_drops_the_rest() -> None:
    lane = Lane("test")
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def long_step() -> None:
        started.set()
        release.wait(30)
        ran.append("long")

    lane.run(long_step)
    later = lane.run(lambda: ran.append("later"))
    assert started.wait(30)
    stopping = threading.Thread(target=lane.stop)
    stopping.start()
    release.set()
    stopping.join(30)
    assert not stopping.is_alive()
    assert ran == ["long"] and later.cancelled()
