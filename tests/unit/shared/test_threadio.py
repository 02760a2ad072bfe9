"""A resource taken in a worker thread is given back when its taker is cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shared.threadio import acquired, interruptible


async def test_what_a_cancelled_caller_took_is_given_back_once_taken() -> None:
    entered, release_thread, given_back = threading.Event(), threading.Event(), asyncio.Event()
    taken: list[str] = []

    def take() -> str:
        entered.set()
        release_thread.wait(5)
        taken.append("file")
        return "file"

    caller = asyncio.create_task(acquired(take, lambda _: given_back.set()))
    assert await asyncio.to_thread(entered.wait, 30)  # the caller waits on the thread
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert not given_back.is_set()
    release_thread.set()  # the thread takes it only now, after the caller has gone
    async with asyncio.timeout(5):
        await given_back.wait()
    assert taken == ["file"]


async def test_a_caller_that_stays_keeps_what_it_took() -> None:
    given_back: list[int] = []
    assert await acquired(lambda: 7, given_back.append) == 7
    assert given_back == []


async def test_a_cancelled_caller_interrupts_the_call_and_waits_for_it() -> None:
    """The buffer a call fills is not handed back while the call still writes into it."""
    entered, interrupted = threading.Event(), threading.Event()
    finished: list[str] = []

    def read() -> int:
        entered.set()
        assert interrupted.wait(30), "never interrupted"
        finished.append("read")
        return 0

    caller = asyncio.create_task(interruptible(read, interrupted.set))
    assert await asyncio.to_thread(entered.wait, 30)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["read"]  # the call had returned before the caller went on


async def test_an_uninterrupted_call_returns_its_value() -> None:
    assert await interruptible(lambda: 7, lambda: None) == 7
