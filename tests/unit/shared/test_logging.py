"""Every line a service prints is JSON when it should be, whoever logged it."""

from __future__ import annotations

import json
import subprocess
import sys

PROGRAM = """
import logging, structlog
from shared.logging import configure_logging
configure_logging("INFO", json=True)
structlog.get_logger("medhive.test").info("ours", job_id="j-1")
logging.getLogger("aiormq.connection").warning("lost the broker: %s", "reset")
logging.getLogger("aio_pika.robust_connection").info("chatter below WARNING")
try:
    raise ValueError("boom")
except ValueError:
    logging.getLogger("aiohttp.server").exception("a library's error")
"""


def test_standard_library_logs_come_out_as_json_lines_beside_ours() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          check=True)  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("ours", "info"),
        ("lost the broker: reset", "warning"),
        ("a library's error", "error"),
    ]
    assert lines[1]["logger"] == "aiormq.connection"
    assert "ValueError: boom" in lines[2]["exception"]
