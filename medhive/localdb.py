"""`python -m medhive.localdb ARGS`: the local MongoDB-protocol server (SecantusDB) that
`medhive up`, the tests and the benchmarks start when no MongoDB is at hand.

Two settings suit medhive's many short operations:
- standalone: medhive uses no change streams and no transactions, so it needs no
  replica set, and a standalone server writes no oplog (a third less work per write);
- a switch interval of 0.5 ms instead of Python's 5 ms: the server is one Python
  process whose connection threads take turns on the interpreter lock, and at the
  default a short request (a lease) waits up to 5 ms behind a long one (an audit
  batch) at every turn.
"""

from __future__ import annotations

import importlib.util
import sys

SWITCH_INTERVAL_S = 0.0005


#: The replica set's name when the server runs as a one-member replica set.
REPLICA_SET = "secantus"


def argv(host: str, port: int, storage_path: str, *, standalone: bool = True) -> list[str]:
    """The command that starts the server on `host:port`, keeping its data in
    `storage_path`; not `standalone`: as the one member of replica set `REPLICA_SET`."""
    return [sys.executable, "-m", "medhive.localdb", "--host", host, "--port", str(port),
            "--storage-path", storage_path, "--log-level", "WARNING",
            *(["--standalone"] if standalone else [])]  # fmt: skip


def available() -> bool:
    """Whether SecantusDB is installed (it comes with the test extra)."""
    return importlib.util.find_spec("secantus") is not None


def main() -> int:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    from secantus.cli import main as serve

    sys.argv[0] = "secantusd-py"
    return int(serve() or 0)


if __name__ == "__main__":
    sys.exit(main())
