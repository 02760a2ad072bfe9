"""The hash chain on its own: canonical form, linking, and what verification catches."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import bson
from bson.codec_options import CodecOptions

from services.audit.chain import GENESIS, Head, canonical_json, link, record_hash, verify


def _record(n: int) -> dict[str, Any]:
    return {
        "_id": f"m{n}",
        "type": "job.queued",
        "tenant": "t1",
        "occurred_at": datetime(2025, 1, 31, 12, 0, n, 123456, tzinfo=UTC),
        "envelope": {"payload": {"job_id": "j1", "n": n}, "id": f"m{n}"},
    }


def _chain(count: int) -> list[dict[str, Any]]:
    head, records = Head(), []
    for n in range(1, count + 1):
        record = _record(n)
        head = link(head, record)
        records.append(record)
    return records


class _Store:
    """Just enough of AuditStore for `verify`."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    async def in_seq_order(self) -> AsyncIterator[dict[str, Any]]:
        for record in sorted(self.records, key=lambda r: r["seq"]):
            yield record

    async def misfiled(self) -> int | None:
        return None  # the blocks' own fields: checked with the real store


def test_canonical_json_sorts_keys_drops_whitespace_and_writes_utc_milliseconds() -> None:
    berlin = timezone(timedelta(hours=1))
    document = {"b": [1, {"d": 2, "c": "é"}], "a": datetime(2025, 1, 31, 13, 0, 0, 123999, berlin)}
    assert canonical_json(document) == (
        b'{"a":"2025-01-31T12:00:00.123+00:00","b":[1,{"c":"\\u00e9","d":2}]}'
    )


def test_link_numbers_from_one_and_chains_each_record_to_the_one_before() -> None:
    first, second = _chain(2)
    assert (first["seq"], first["prev_hash"]) == (1, GENESIS)
    assert (second["seq"], second["prev_hash"]) == (2, first["hash"])
    content = {k: v for k, v in first.items() if k != "hash"}
    assert first["hash"] == hashlib.sha256(GENESIS.encode() + canonical_json(content)).hexdigest()


def test_hash_covers_every_field_but_itself() -> None:
    (record,) = _chain(1)
    assert record_hash({**record, "hash": "anything"}) == record["hash"]
    assert record_hash(dict(reversed(record.items()))) == record["hash"]
    for key, value in [("tenant", "t2"), ("seq", 2), ("envelope", {}), ("extra", 1)]:
        assert record_hash({**record, key: value}) != record["hash"], key


def test_hash_survives_a_round_trip_through_bson() -> None:
    """MongoDB keeps milliseconds and hands times back in UTC: the hash must not change."""
    (record,) = _chain(1)
    back: dict[str, Any] = bson.decode(bson.encode(record), CodecOptions(tz_aware=True))
    assert back["occurred_at"] != record["occurred_at"]  # microseconds are gone
    assert record_hash(back) == record["hash"]


async def test_verify_accepts_an_untouched_chain() -> None:
    verdict = await verify(_Store(_chain(5)))  # type: ignore[arg-type]
    assert (verdict.ok, verdict.records, verdict.first_bad_seq) == (True, 5, None)
    assert verdict.last_seq == 5


async def test_verify_reports_a_changed_record() -> None:
    records = _chain(5)
    records[2]["tenant"] = "t2"
    verdict = await verify(_Store(records))  # type: ignore[arg-type]
    assert (verdict.ok, verdict.first_bad_seq, verdict.last_seq) == (False, 3, 2)
    assert "hash" in str(verdict.problem)


async def test_verify_reports_a_record_rewritten_with_a_fresh_hash_at_the_next_link() -> None:
    records = _chain(5)
    records[2]["tenant"] = "t2"
    records[2]["hash"] = record_hash(records[2])
    verdict = await verify(_Store(records))  # type: ignore[arg-type]
    assert (verdict.ok, verdict.first_bad_seq) == (False, 4)
    assert "prev_hash" in str(verdict.problem)


async def test_verify_reports_a_deleted_record_as_a_gap() -> None:
    records = _chain(5)
    del records[1]
    verdict = await verify(_Store(records))  # type: ignore[arg-type]
    assert (verdict.ok, verdict.first_bad_seq) == (False, 2)
    assert "missing" in str(verdict.problem)
