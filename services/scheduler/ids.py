"""Job ids that sort by creation time, so listing pages by id is listing by age."""

from __future__ import annotations

import secrets
import time


def new_job_id() -> str:
    """`j-` + 12 hex digits of milliseconds since the epoch + 8 random hex digits."""
    return f"j-{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"
