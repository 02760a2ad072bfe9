"""The hash chain that makes tampering with the audit store detectable.

Each record carries `prev_hash` (the hash of the record before it, or `GENESIS` for
the first) and `hash = sha256(prev_hash + canonical_json(record without hash))`.
Changing a stored field breaks that record's hash; deleting a record leaves a gap in
`seq` or breaks the link; rewriting a record together with its hash breaks the link
of the next one. Only rewriting the whole tail from the tampered record on, or
cutting the tail off, goes unnoticed: `verify` reports the last hash so that an
operator can keep it elsewhere and compare.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from services.audit.store import AuditStore

GENESIS = "0" * 64


def to_millis(moment: datetime) -> datetime:
    """`moment` in UTC to the millisecond, as MongoDB stores it.

    A record is hashed before it is stored and again after it is read back, so it must
    hash the same both ways; naive times (AMQP timestamps) are taken as UTC.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).replace(microsecond=moment.microsecond // 1000 * 1000)


def iso(moment: datetime) -> str:
    """The one text form of a time in hashes and API output."""
    return to_millis(moment).isoformat(timespec="milliseconds")


def _encode(value: Any) -> str:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"{type(value).__name__} has no canonical JSON form")


def canonical_json(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, no whitespace, ASCII only, times as ISO strings: one text per record."""
    text = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_encode
    )
    return text.encode("ascii")


def record_hash(record: Mapping[str, Any]) -> str:
    """The hash a record must carry, computed from everything in it but `hash`."""
    content = {key: value for key, value in record.items() if key != "hash"}
    prev_hash = str(record.get("prev_hash", ""))
    return hashlib.sha256(prev_hash.encode() + canonical_json(content)).hexdigest()


@dataclass(frozen=True)
class Head:
    """The newest record of the chain: the next record links to it."""

    seq: int = 0
    hash: str = GENESIS


def link(head: Head, record: dict[str, Any]) -> Head:
    """Give `record` the next `seq`, chain it to `head`, seal it; returns the new head."""
    record["seq"] = head.seq + 1
    record["prev_hash"] = head.hash
    record["hash"] = record_hash(record)
    return Head(record["seq"], record["hash"])


@dataclass(frozen=True)
class Verdict:
    """What `verify` found; `last_seq`/`last_hash` are the last record that checked out."""

    ok: bool
    records: int
    first_bad_seq: int | None = None
    problem: str | None = None
    last_seq: int = 0
    last_hash: str = GENESIS

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def verify(store: AuditStore) -> Verdict:
    """Walk every record in `seq` order: no gap, each linked to the one before, each intact."""
    head, count = Head(), 0

    def bad(seq: int, problem: str) -> Verdict:
        return Verdict(False, count, seq, problem, head.seq, head.hash)

    async for record in store.in_seq_order():
        count += 1
        seq = record.get("seq")
        if seq != head.seq + 1:
            return bad(head.seq + 1, f"seq {head.seq + 1} is missing (next record has {seq!r})")
        if record.get("prev_hash") != head.hash:
            return bad(seq, f"prev_hash does not match the hash of record {head.seq}")
        try:
            intact = record_hash(record) == record.get("hash")
        except (TypeError, ValueError):  # a field of a type no recorder writes
            intact = False
        if not intact:
            return bad(seq, "hash does not match the record's content")
        head = Head(seq, record["hash"])
    if (misfiled := await store.misfiled()) is not None:
        return bad(misfiled, "a block's ids, lookup keys or times do not match its records")
    return Verdict(True, count, last_seq=head.seq, last_hash=head.hash)
