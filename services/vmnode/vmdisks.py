"""A VM job's disks, made and read without mounting anything on the host.

- the overlay: a qcow2 file on top of the job's base image, so the base is never
  written and each attempt starts from the same image;
- the data ISO: the inputs, read-only, at their paths (Rock Ridge and Joliet names,
  for Linux and Windows guests);
- the writable disk (ext4 or FAT32): filled with the inputs in `disk` mode, always with
  an empty `outputs/` directory, whose content comes back as the job's results.

ext4 images are written and read with debugfs, FAT images with mtools: no loop mount,
so nothing of a guest's filesystem is ever interpreted by the host kernel.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.vmnode.runtimes.base import Mount, WorkloadRefused
from shared.messages.data import OUTPUTS_PATH

OUTPUTS_DIR = OUTPUTS_PATH.strip("/")


async def tool(*argv: str, stdin: bytes | None = None) -> str:
    """Run a disk tool; its complaint becomes the job's failure reason."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(stdin)
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()
        raise WorkloadRefused(f"{argv[0]} failed: {detail[-1] if detail else process.returncode}")
    return out.decode(errors="replace")


async def make_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 overlay whose backing file is `base` (qcow2), which stays read-only."""
    await tool(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)
    )


def _inputs(mounts: Sequence[Mount]) -> list[Mount]:
    return [m for m in mounts if m.read_only and m.target != OUTPUTS_PATH]


async def make_iso(mounts: Sequence[Mount], iso: Path) -> bool:
    """The inputs on a read-only ISO at their paths; False when there are none."""
    inputs = _inputs(mounts)
    if not inputs:
        return False
    grafts = [f"{m.target.lstrip('/')}/={m.source}" for m in inputs]
    await tool(
        "genisoimage", "-quiet", "-R", "-J", "-joliet-long", "-V", "MEDHIVE",
        "-graft-points", "-o", str(iso), *grafts,
    )  # fmt: skip
    return True


async def make_disk(
    disk: Path, size_mb: int, filesystem: str, mounts: Sequence[Mount], with_inputs: bool
) -> None:
    """The writable disk: an empty `outputs/`, and the inputs when `with_inputs`."""
    inputs = _inputs(mounts) if with_inputs else []
    await asyncio.to_thread(_sparse_file, disk, size_mb * 1024 * 1024)
    if filesystem == "ext4":
        await tool("mkfs.ext4", "-q", "-F", "-L", "MEDHIVE", str(disk))
        await tool("debugfs", "-w", "-f", "-", str(disk), stdin=_debugfs_fill(inputs).encode())
    else:
        await tool("mkfs.vfat", "-F", "32", "-n", "MEDHIVE", str(disk))
        image = ["-i", str(disk)]
        await tool("mmd", *image, f"::/{OUTPUTS_DIR}")
        for mount in inputs:
            parts = mount.target.strip("/").split("/")
            for depth in range(1, len(parts) + 1):
                await tool("mmd", "-D", "s", *image, "::/" + "/".join(parts[:depth]))
            for entry in sorted(mount.source.iterdir()):
                await tool("mcopy", "-s", "-n", *image, str(entry), f"::{mount.target}/")


def _sparse_file(path: Path, size: int) -> None:
    with path.open("wb") as handle:
        handle.truncate(size)


def _debugfs_fill(inputs: Sequence[Mount]) -> str:
    """debugfs commands that copy the inputs in and make a writable `outputs/`."""
    lines = [f"mkdir {OUTPUTS_DIR}", f"sif {OUTPUTS_DIR} mode 040777"]
    made: set[str] = set()
    for mount in inputs:
        base = mount.target.strip("/")
        for path in sorted(mount.source.rglob("*")):
            rel = path.relative_to(mount.source).as_posix()
            target = f"{base}/{rel}"
            parts = target.split("/")
            for depth in range(1, len(parts)):
                prefix = "/".join(parts[:depth])
                if prefix not in made:
                    lines.append(f'mkdir "{prefix}"')
                    made.add(prefix)
            if path.is_dir() and not path.is_symlink():
                if target not in made:
                    lines.append(f'mkdir "{target}"')
                    made.add(target)
            elif path.is_file() and not path.is_symlink():
                lines.append(f'write "{path}" "{target}"')
    if any('"' in line.split(" ", 1)[1].replace('" "', "").strip('"') for line in lines[2:]):
        raise WorkloadRefused('an input file name contains a double quote (")')
    return "\n".join(lines) + "\n"


async def read_outputs(disk: Path, filesystem: str, into: Path) -> None:
    """Copy the disk's `outputs/` tree into `into` (symlinks are kept as links, and the
    node's collector never follows them)."""
    with tempfile.TemporaryDirectory(dir=into.parent) as scratch:
        if filesystem == "ext4":
            await tool("debugfs", "-R", f"rdump /{OUTPUTS_DIR} {scratch}", str(disk))
        else:
            await tool("mcopy", "-s", "-n", "-i", str(disk), f"::/{OUTPUTS_DIR}", scratch)
        await asyncio.to_thread(_move_children, Path(scratch) / OUTPUTS_DIR, into)


def _move_children(source: Path, into: Path) -> None:
    if source.is_dir():
        for entry in source.iterdir():
            shutil.move(str(entry), into / entry.name)
