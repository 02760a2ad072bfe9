"""The notifier's newest records: what it gives a live stream is exactly the stored run
after the stream's cursor, or nothing when it does not hold all of that run."""

from __future__ import annotations

from typing import Any

from services.audit.recorder import Notifier


def records(first: int, last: int) -> list[dict[str, Any]]:
    return [{"_id": f"m{seq}", "seq": seq} for seq in range(first, last + 1)]


def seqs(found: list[dict[str, Any]] | None) -> list[int] | None:
    return None if found is None else [record["seq"] for record in found]


def test_the_run_after_a_cursor_comes_from_memory_while_memory_holds_it() -> None:
    notifier = Notifier(recent=5)
    notifier.advance(0)  # the recorder's start: the store's head, no record in memory
    assert seqs(notifier.recent(0, 0)) == []
    notifier.advance(3, records(1, 3))
    notifier.advance(7, records(4, 7))
    assert notifier.head == 7
    assert seqs(notifier.recent(4, 7)) == [5, 6, 7]
    assert seqs(notifier.recent(2, 6)) == [3, 4, 5, 6]
    assert seqs(notifier.recent(1, 7)) is None  # 2 is no longer held: read the store
    assert seqs(notifier.recent(7, 7)) == []


def test_a_gap_in_what_was_stored_drops_what_came_before_it() -> None:
    notifier = Notifier(recent=10)
    notifier.advance(3, records(1, 3))
    notifier.advance(8, records(6, 8))  # 4 and 5 were stored by a try that failed
    assert seqs(notifier.recent(5, 8)) == [6, 7, 8]
    assert seqs(notifier.recent(3, 8)) is None
    notifier.advance(20)  # a head reloaded from the store
    assert seqs(notifier.recent(8, 20)) is None
