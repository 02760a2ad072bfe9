"""The README's first command, `bash scripts/demo.sh`, as a newcomer runs it: the first
job, then the tour (a data job from the local PACS, a VM job reached through the
gateway, the audit), each step checked by the script itself; run twice, the second run
finds everything in place and does it all again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS_OK = [
    "ok: the container saw all 8 instances, byte for byte as the PACS holds them",
    "ok: its summary downloaded to",
    "ok: the second job fetched nothing from the PACS",
    "ok: the guest answered through the forwarded port",
    "ok: the job was cancelled",
    "ok: the port is closed now that the job has ended",
    "ok: the node's reads are recorded",
    "ok: the chain verifies",
]


def _stack_runs() -> bool:
    try:
        urllib.request.urlopen("http://127.0.0.1:8080/healthz", timeout=2).close()
    except OSError:
        return False
    return True


def _demo(stop: bool) -> str:
    env = {**os.environ, "MEDHIVE_DEMO_STOP": "1" if stop else "0"}
    done = subprocess.run(
        ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout


def test_the_demo_shows_every_step_and_runs_again() -> None:
    ours = not _stack_runs()  # a stack that ran before the test keeps running after it
    first = _demo(stop=False)
    _console_opens_with_the_printed_tokens(first)
    second = _demo(stop=ours)
    for shown in (first, second):
        assert "hello from a medhive job" in shown
        for ok in STEPS_OK:
            assert ok in shown, ok
        assert "[tour] every step showed what it should" in shown
    # The second run made nothing again: the same study, the running services kept.
    study = re.compile(r"study (\S+) of 8 instances")
    assert study.findall(first) == study.findall(second) != []
    assert "restarting the services" not in second
    assert "starting the services" not in second


def _console_opens_with_the_printed_tokens(shown: str) -> None:
    """The console's address and the tokens the demo prints sign in there."""
    url = re.search(r"the web console: (\S+)", shown)
    tokens = re.findall(r"(?:sign in as the demo user|as an operator).* with: (\S+)", shown)
    assert url is not None and len(tokens) == 2, shown[-2000:]
    with urllib.request.urlopen(url.group(1), timeout=10) as page:
        assert b"console.js" in page.read()
    roles = []
    for token in tokens:
        request = urllib.request.Request(
            url.group(1).replace("/ui/", "/v1/me"), headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            roles.append(json.load(answer)["role"])
    assert roles == ["user", "operator"]
