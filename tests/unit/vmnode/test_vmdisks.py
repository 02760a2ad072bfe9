"""A VM's data disks, made and read back with the real tools and never mounted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.vmnode.runtimes.base import Mount
from services.vmnode.vmdisks import make_disk, make_iso, make_overlay, read_outputs, tool


def inputs(tmp_path: Path) -> list[Mount]:
    scan = tmp_path / "inputs" / "scan"
    (scan / "series 1").mkdir(parents=True)
    (scan / "series 1" / "image.dcm").write_bytes(b"DICM" * 1000)
    (scan / "notes.txt").write_text("hello\n")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    return [Mount(scan, "/data/scan"), Mount(outputs, "/outputs", read_only=False)]


async def test_the_overlay_leaves_its_base_untouched(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.qcow2", tmp_path / "root.qcow2"
    await tool("qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M")
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    await make_overlay(base, overlay)
    info = await tool("qemu-img", "info", "--output=json", str(overlay))
    assert f'"backing-filename": "{base}"' in info
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before


async def test_the_iso_holds_the_inputs_at_their_paths(tmp_path: Path) -> None:
    iso = tmp_path / "data.iso"
    assert await make_iso(inputs(tmp_path), iso)
    listing = await tool("isoinfo", "-R", "-f", "-i", str(iso))
    assert "/data/scan/series 1/image.dcm" in listing.splitlines()
    content = await tool("isoinfo", "-R", "-i", str(iso), "-x", "/data/scan/notes.txt")
    assert content == "hello\n"
    assert not await make_iso([], tmp_path / "none.iso")  # no inputs, no ISO


@pytest.mark.parametrize("filesystem", ["ext4", "fat32"])
async def test_a_disk_carries_inputs_in_and_results_out(tmp_path: Path, filesystem: str) -> None:
    disk = tmp_path / "data.img"
    mounts = inputs(tmp_path)
    await make_disk(disk, 40, filesystem, mounts, with_inputs=True)
    # Read the input back and write a result, as a guest would.
    if filesystem == "ext4":
        got = await tool("debugfs", "-R", 'cat "/data/scan/series 1/image.dcm"', str(disk))
        result = tmp_path / "result.txt"
        result.write_text("42\n")
        await tool("debugfs", "-w", "-R", f"write {result} outputs/result.txt", str(disk))
    else:
        got = await tool("mtype", "-i", str(disk), "::/data/scan/series 1/image.dcm")
        result = tmp_path / "result.txt"
        result.write_text("42\n")
        await tool("mcopy", "-i", str(disk), str(result), "::/outputs/result.txt")
    assert got == "DICM" * 1000
    into = tmp_path / "collected"
    into.mkdir()
    await read_outputs(disk, filesystem, into)
    assert [p.name for p in into.iterdir()] == ["result.txt"]
    assert (into / "result.txt").read_text() == "42\n"


async def test_an_empty_results_disk_gives_no_outputs(tmp_path: Path) -> None:
    disk, into = tmp_path / "data.img", tmp_path / "collected"
    into.mkdir()
    await make_disk(disk, 16, "ext4", inputs(tmp_path), with_inputs=False)
    assert "notes.txt" not in await tool("debugfs", "-R", "ls -p /", str(disk))
    await read_outputs(disk, "ext4", into)
    assert list(into.iterdir()) == []
