"""The README's integrator program, copied out as a user copies it, run against the
real services with a user made as the README says."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from medhive import integrators
from shared.settings import AmqpSettings, MongoSettings
from tests.conftest import provisioning, rabbit_api
from tests.processes import Stack

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_program(heading: str) -> str:
    """The first Python block after `heading` in the README."""
    text = README.read_text()
    section = text[text.index(heading) :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no Python block after {heading!r}"
    return match.group(1)


async def test_the_readme_program_submits_a_job_and_follows_it_to_its_end(
    stack: Stack, amqp_settings: AmqpSettings, mongo_settings: MongoSettings, tmp_path: Path
) -> None:
    name = f"ris-{uuid.uuid4().hex[:6]}"
    async with provisioning(amqp_settings, mongo_settings) as (api, users):
        url = await integrators.add(api, users, name, "radiology")
    program = tmp_path / "follow.py"
    program.write_text(readme_program("### Submitting a job and following it"))

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(program)],
        env={**os.environ, "MEDHIVE_INTEGRATOR_URL": url},
        capture_output=True,
        text=True,
        timeout=180,
    )
    rabbit_api("DELETE", f"/users/{name}")
    assert done.returncode == 0, done.stderr
    lines = [line.split()[0] for line in done.stdout.splitlines()]
    assert lines == ["job.submitted", "job.queued", "job.dispatched", "job.running",
                     "job.succeeded"]  # fmt: skip
