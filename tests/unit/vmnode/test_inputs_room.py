"""A job's inputs fit the tmpfs the node mounts for them, however many files they are."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.vmnode.jobdata import MIB, room_for

#: A study's instances (small ones, each less than two pages), a series file, and edges.
SIZES = [5000] * 1500 + [5 * MIB + 1, 0, 4096, 1]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "inputs"
    root.mkdir()
    size = room_for(SIZES)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "medhive-test", str(root)],
                   check=True)  # fmt: skip
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_thousands_of_small_inputs_fit_their_tmpfs(tmpfs: Path) -> None:
    for i, size in enumerate(SIZES):
        series = tmpfs / "study" / f"series-{i % 7}"
        series.mkdir(parents=True, exist_ok=True)
        (series / f"{i:05}.dcm").write_bytes(b"\x01" * size)
    assert sum(p.stat().st_size for p in tmpfs.rglob("*.dcm")) == sum(SIZES)
