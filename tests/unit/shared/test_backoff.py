"""The one doubling wait (shared/backoff.py)."""

from __future__ import annotations

from shared.backoff import Backoff


def test_waits_double_from_the_first_up_to_the_bound() -> None:
    backoff = Backoff(0.1, 1.0)
    assert [backoff.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_the_wait_after_a_known_number_of_tries_is_the_same_sequence() -> None:
    backoff = Backoff(0.2, 10.0)
    assert [backoff.after(tries) for tries in range(8)] == [
        0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0
    ]  # fmt: skip
