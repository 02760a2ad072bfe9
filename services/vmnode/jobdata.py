"""A job's data on the node: inputs fetched under a grant, /outputs sent back, then wiped.

Each attempt gets a private directory `work_dir/<job>.<attempt>` owned by the workload's
uid with mode 0700. Inputs go to `inputs/<name>/` (a tmpfs when they fit, so patient
data never touches the node's disk), each file checked against its SHA-256 and made
read-only; the container sees each input read-only at its path. `/outputs` is a tmpfs
of the size the job asked for, so a runaway job fills its own bound, not the node's
disk. After the run its regular files (never symlinks) are stored in the datacache,
and the directory is unmounted and removed whatever happened.

One module because `prepare`, `collect` and `wipe` work on the same attempt directory
(its layout, the `READY` and `job.json` files, the tmpfs mounts owned by the workload's
uid), and after an agent restart `collect` and `wipe_orphans` rely on what `prepare`
left there; inputs and results go through the one authenticated datacache session.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import aiohttp
import structlog

from services.vmnode.runtimes.base import Mount
from services.vmnode.settings import NodeSettings
from shared.download import Download, DownloadFailed, ReadsInto
from shared.messages.data import OUTPUTS_PATH, InputManifest, StagedFile
from shared.messages.jobs import JobSpec, NodeRun
from shared.pipeline import Lane
from shared.sealed import DATA_KEY_HEADER, TAG, Header, IntegrityError, Opener, read_header
from shared.threadio import acquired, interruptible

log = structlog.get_logger("medhive.vmnode.jobdata")

CHUNK = 1 << 20
#: Segments of a sealed input opened per hop to a worker thread.
OPEN_BATCH = 8
#: Stored objects of at most this many bytes (a study's instances, mostly) are read
#: whole and placed in one trip to a worker thread: handing each step of the pipeline
#: to a thread of its own cost more than the decryption.
WHOLE = 1 << 20
#: Input files fetched at once: a study is thousands of small instances, each of which
#: would otherwise wait out its own round trips (the datacache records every read
#: before it answers the next on that connection). 16 rather than 4 took a study of
#: 200 instances onto the node in 0.30 s rather than 0.36 (`bench.datacache`).
PARALLEL_DOWNLOADS = 16
#: Of those, files larger than `WHOLE` at once: each holds up to three batches in memory.
PARALLEL_LARGE = 4
#: How long a read from the datacache may wait for data before the fetch fails.
READ_TIMEOUT_S = 120.0
#: Where large inputs are received: a thread each (waiting on the network, they are
#: kept out of the pool that opens, hashes and writes).
_RECEIVING = ThreadPoolExecutor(PARALLEL_LARGE, thread_name_prefix="node-receive")
#: Where sealed batches are opened, in any order, on every core.
_OPENING = ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="unseal-open")
MIB = 1024 * 1024
#: A tmpfs gives each file whole pages of this size.
PAGE = os.sysconf("SC_PAGE_SIZE")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
READY = ".ready"
#: What `collect` needs to know after an agent restart, kept beside the data.
SPEC = "job.json"


def room_for(sizes: Iterable[int]) -> int:
    """The size of a tmpfs that holds files of these sizes: each takes whole pages, so a
    study of thousands of small instances needs megabytes more than its bytes (sized
    by the bytes, 600 instances of 100 KiB ran out of room), and a MiB to spare."""
    return sum(-(-size // PAGE) * PAGE for size in sizes) + MIB


class DataUnavailable(Exception):
    """The job's data could not be placed on, or stored from, this node."""


class JobData:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                base_url=self.settings.datacache_url.rstrip("/") + "/",
                headers=self._credentials(),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=30, sock_read=READ_TIMEOUT_S
                ),
                auto_decompress=False,
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def directory(self, job_id: str, attempt: int) -> Path:
        return self.settings.work_dir / f"{_UNSAFE.sub('-', job_id)}.{attempt}"

    # -- before the run -----------------------------------------------------------------

    async def prepare(self, run: NodeRun) -> list[Mount]:
        """Fetch the job's inputs and make its /outputs; the mounts the workload gets."""
        spec = run.spec
        if not spec.needs_data:
            return []
        root = self.directory(run.job_id, run.attempt)
        if (root / READY).exists():  # a redelivered run whose data is in place
            return self._mounts(root, spec)
        await self.wipe(run.job_id, run.attempt)  # whatever a broken try left
        manifest = await self.manifest(run.job_id)
        total = sum(f.size for item in manifest for f in item.files)
        await asyncio.to_thread(self._make_root, root)
        if spec.inputs:
            room = room_for(f.size for item in manifest for f in item.files)
            if room <= self.settings.tmpfs_inputs_mb * MIB:
                await self._mount_tmpfs(root / "inputs", room)
            await self._download_all(
                run.job_id,
                [(entry, root / "inputs" / item.name) for item in manifest for entry in item.files],
            )
            await asyncio.to_thread(self._seal_inputs, root / "inputs")
        if spec.outputs is not None:
            await self._mount_tmpfs(root / "outputs", spec.outputs.max_mb * MIB, writable=True)
        (root / SPEC).write_text(spec.model_dump_json())
        (root / READY).touch()
        log.info("inputs_placed", files=sum(len(i.files) for i in manifest), bytes=total)
        return self._mounts(root, spec)

    def _mounts(self, root: Path, spec: JobSpec) -> list[Mount]:
        mounts = [Mount(root / "inputs" / item.name, item.path) for item in spec.inputs]
        if spec.outputs is not None:
            mounts.append(Mount(root / "outputs", OUTPUTS_PATH, read_only=False))
        return mounts

    async def manifest(self, job_id: str) -> list[InputManifest]:
        """The job's inputs, file by file, as its live grant names them."""
        async with self.http.get(f"v1/jobs/{job_id}/inputs") as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise DataUnavailable(f"the datacache refused the inputs: {_detail(body)}")
        return [InputManifest.model_validate(item) for item in body["inputs"]]

    async def delegate(self, job_id: str) -> str:
        """A token standing for this node on the job's grant only, for a task the node
        runs on another host (the datacache's `GrantService.delegate`)."""
        async with self.http.post(f"v1/jobs/{job_id}/delegates") as response:
            body = await response.json(content_type=None)
            if response.status != 201:
                raise DataUnavailable(f"the datacache refused a delegated token: {_detail(body)}")
        return str(body["token"])

    async def _download_all(self, job_id: str, files: list[tuple[StagedFile, Path]]) -> None:
        """Every file, `PARALLEL_DOWNLOADS` at a time (`PARALLEL_LARGE` of the large). The
        first failure stops the rest and is raised."""
        pending = iter(files)
        large = asyncio.Semaphore(PARALLEL_LARGE)

        async def worker() -> None:
            for entry, base in pending:  # the workers share one iterator
                async with large if entry.size > WHOLE else contextlib.nullcontext():
                    await self._download(job_id, entry, base)

        workers = [asyncio.create_task(worker()) for _ in range(PARALLEL_DOWNLOADS)]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _download(self, job_id: str, entry: StagedFile, base: Path) -> None:
        """One object into `base/path`, refused unless it authenticates and its SHA-256
        is the one granted. The datacache sends it as stored, with its data key; it is
        opened here (see the datacache's `read_sealed` for why)."""
        rel, sha = entry.path, entry.sha256
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise DataUnavailable(f"input file {rel!r} would escape its directory")
        target = base / rel
        path = f"v1/jobs/{job_id}/objects/{sha}/sealed"
        try:
            if entry.size <= WHOLE:
                digest = await self._placed_whole(path, rel, target)
            else:
                digest = await self._streamed(path, rel, target)
        except IntegrityError as exc:
            verdict = await self._report_damage(job_id, sha)
            raise DataUnavailable(
                f"input file {rel} failed authentication ({exc}); {verdict}"
            ) from exc
        if digest != sha:
            raise DataUnavailable(f"input file {rel} arrived with the wrong SHA-256")

    async def _placed_whole(self, path: str, rel: str, target: Path) -> str:
        """An object of an instance's size: read whole, then opened, checked and written
        in one trip to a worker thread; its SHA-256."""
        async with self.http.get(path) as response:
            if response.status != 200:
                body = await response.json(content_type=None)
                raise DataUnavailable(f"the datacache refused {rel}: {_detail(body)}")
            data_key = _data_key(rel, response.headers.get(DATA_KEY_HEADER))
            try:
                raw = await response.read()
            except aiohttp.ClientPayloadError as exc:
                raise DataUnavailable(f"the transfer of input file {rel} broke off: {exc}") from exc
        return await asyncio.to_thread(_place_whole, raw, data_key, target)

    async def _streamed(self, path: str, rel: str, target: Path) -> str:
        """A large object: read by one of the node's receiving threads straight into the
        batches it is opened from (`shared.download`: the event loop handing over its
        64 KiB chunks was the dearest part of a fetch), opened, hashed and written as it
        comes, that thread driving the pipeline itself (`unseal`); its SHA-256."""
        url = self.settings.datacache_url.rstrip("/") + "/" + path
        download = Download(url, self._credentials(), verify_tls=True, timeout_s=READ_TIMEOUT_S)
        try:
            await interruptible(download.open, download.abort, _RECEIVING)
            data_key = _data_key(rel, download.header(DATA_KEY_HEADER))
            if (stored := download.total) is None:
                raise DataUnavailable(f"the datacache sent {rel} without its length")
            unsealing = functools.partial(_unsealed_into, target, download, stored, data_key)
            return await interruptible(unsealing, download.abort, _RECEIVING)
        except DownloadFailed as exc:
            if exc.status is not None:
                raise DataUnavailable(f"the datacache refused {rel}: {_said(exc.said)}") from exc
            raise DataUnavailable(f"the transfer of input file {rel} broke off: {exc}") from exc
        finally:
            download.close()

    def _credentials(self) -> dict[str, str]:
        token = self.settings.datacache_token
        return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}

    async def _report_damage(self, job_id: str, sha: str) -> str:
        """Tell the datacache; what it made of it, for the job's reason."""
        try:
            async with self.http.post(f"v1/jobs/{job_id}/objects/{sha}/damaged") as response:
                body = await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            return f"reporting it to the datacache failed: {exc}"
        if response.status != 200:
            return f"the datacache refused the report: {_detail(body)}"
        if body.get("quarantined"):
            return "the datacache found it damaged and quarantined it"
        return "the datacache found its copy sound (damaged on the way?)"

    def _make_root(self, root: Path) -> None:
        uid, gid = self.settings.workload_ids
        self.settings.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.settings.work_dir, 0o711)  # lets the container reach its own dir only
        root.mkdir(mode=0o700)
        (root / "inputs").mkdir(mode=0o700)
        (root / "outputs").mkdir(mode=0o700)
        for path in (root, root / "inputs", root / "outputs"):
            os.chown(path, uid, gid)

    def _seal_inputs(self, inputs: Path) -> None:
        """Inputs belong to the workload's uid and cannot be changed by it."""
        uid, gid = self.settings.workload_ids
        for dirpath, dirnames, filenames in os.walk(inputs):
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid)
                os.chmod(os.path.join(dirpath, name), 0o400)
            for name in dirnames:
                os.chown(os.path.join(dirpath, name), uid, gid)
                os.chmod(os.path.join(dirpath, name), 0o500)
        os.chown(inputs, uid, gid)
        os.chmod(inputs, 0o500)

    async def _mount_tmpfs(self, path: Path, size: int, writable: bool = False) -> None:
        """A tmpfs owned by the workload's uid; without the privilege, a plain directory."""
        uid, gid = self.settings.workload_ids
        options = f"size={max(size, MIB)},mode=0700,uid={uid},gid={gid},nosuid,nodev,noexec"
        process = await asyncio.create_subprocess_exec(
            "mount", "-t", "tmpfs", "-o", options, "medhive-job", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await process.communicate()
        if process.returncode != 0:
            log.warning("tmpfs_unavailable", path=str(path), writable=writable,
                        reason=err.decode(errors="replace").strip())  # fmt: skip

    # -- after the run ------------------------------------------------------------------

    async def collect(
        self,
        job_id: str,
        attempt: int,
        export: Callable[[Path], Awaitable[None]] | None = None,
    ) -> list[StagedFile]:
        """Store the regular files under /outputs in the datacache; what it stored.

        `export` first brings them out of a workload that keeps them inside (a VM's
        disk). A job without data has no directory here: that costs one look."""
        root = self.directory(job_id, attempt)
        outputs = root / "outputs"
        found = await asyncio.to_thread(_spec_and_outputs, root)
        if found is None:
            return []  # a job without data
        spec_json, has_outputs = found
        spec = JobSpec.model_validate_json(spec_json)
        if spec.outputs is None:
            return []
        if export is not None and has_outputs:
            await export(outputs)
        files = await asyncio.to_thread(_regular_files, outputs)
        limit = spec.outputs.max_mb * MIB
        if sum(size for _, size in files) > limit:
            raise DataUnavailable(f"/outputs holds more than the {spec.outputs.max_mb} MiB asked")
        stored = []
        for rel, size in files:
            async with self.http.put(
                f"v1/jobs/{job_id}/outputs/{rel}",
                data=_read_file(outputs / rel),
                headers={"Content-Length": str(size)},
            ) as response:
                if response.status != 201:
                    body = await response.json(content_type=None)
                    raise DataUnavailable(f"the datacache refused output {rel}: {_detail(body)}")
                stored.append(StagedFile.model_validate(await response.json()))
        return stored

    async def wipe(self, job_id: str, attempt: int) -> None:
        """Unmount and delete the attempt's directory; nothing of the job stays behind."""
        root = self.directory(job_id, attempt)
        # One hop to a worker thread when nothing is mounted (most jobs): it looks and
        # removes at once.
        mounted = await asyncio.to_thread(_removed_unless_mounted, root)
        for path in mounted:
            process = await asyncio.create_subprocess_exec(
                "umount", "-l", str(path), stderr=asyncio.subprocess.DEVNULL
            )
            await process.wait()
        if mounted:
            await asyncio.to_thread(shutil.rmtree, root, True)

    async def wipe_orphans(self, keep: set[tuple[str, int]]) -> None:
        """Remove directories no workload of this node needs (a crash between steps)."""
        wanted = {self.directory(job, attempt).name for job, attempt in keep}
        names = await asyncio.to_thread(
            lambda: os.listdir(self.settings.work_dir) if self.settings.work_dir.exists() else []
        )
        for name in names:
            if name not in wanted and "." in name:
                job, _, attempt = name.rpartition(".")
                if attempt.isdigit():
                    log.info("job_dir_orphaned", dir=name)
                    await self.wipe(job, int(attempt))


def _spec_and_outputs(root: Path) -> tuple[str, bool] | None:
    """The job's spec as `prepare` kept it, and whether its /outputs is there; None
    for a job without data."""
    try:
        spec_json = (root / SPEC).read_text()
    except FileNotFoundError:
        return None
    return spec_json, (root / "outputs").is_dir()


def _removed_unless_mounted(root: Path) -> list[Path]:
    """The attempt's mounted directories; when there are none, the attempt's directory
    is removed as well."""
    mounted = [root / sub for sub in ("outputs", "inputs") if os.path.ismount(root / sub)]
    if not mounted:
        shutil.rmtree(root, True)
    return mounted


def _regular_files(root: Path) -> list[tuple[str, int]]:
    """Regular files under `root`, relative, without following any symlink."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            info = os.lstat(full)
            if os.path.isfile(full) and not os.path.islink(full):
                found.append((os.path.relpath(full, root), info.st_size))
    return sorted(found)


def unseal(source: ReadsInto, stored: int, data_key: bytes, out: BinaryIO) -> str:
    """Open a sealed object of `stored` bytes, read off `source`, into `out`; its SHA-256
    (blocking).

    A pipeline, as on the datacache's side, which the calling thread drives: while it
    reads the next batch of segments, the ones before are authenticated and decrypted
    by worker threads (in any order, on any core), then hashed in one lane and written
    in another (`shared.pipeline.Lane`), each taking the batches in order as soon as
    they are opened. Handed over by the event loop instead, each batch cost futures,
    callbacks and wake-ups on the loop. The batches are read into the same few buffers
    (a fresh one was zeroed first: 7% of a fetch's CPU). Nothing is hashed or written
    that has not been authenticated; a failure raises `IntegrityError` and leaves a
    partial file, which the caller's wipe removes.
    """
    header = read_header(functools.partial(_exactly, source))
    opener = Opener.with_key(header, data_key)
    last = opener.segments(stored) - 1
    body = stored - len(header.raw)
    full = opener.segment_size + TAG
    digest = hashlib.sha256()

    def hashed(opened: Future[list[bytes]]) -> None:
        for segment in opened.result():
            digest.update(segment)

    def written(opened: Future[list[bytes]], hashing: Future[None]) -> None:
        out.writelines(opened.result())
        hashing.result()  # the batch is done once it is hashed too

    hashing, writing = Lane("unseal-hash"), Lane("unseal-write")
    #: Each batch in the pipeline, done once written and hashed, and its buffer.
    steps: deque[tuple[Future[None], bytearray]] = deque()
    free: list[bytearray] = []
    try:
        for first in range(0, last + 1, OPEN_BATCH):
            count = min(OPEN_BATCH, last + 1 - first)
            buffer = free.pop() if free else bytearray(OPEN_BATCH * full)
            raw = memoryview(buffer)[: min(count * full, body - first * full)]
            _fill(source, raw)
            opened = _OPENING.submit(opener.open_run, raw, first, count, last)
            batch_hashed = hashing.run(functools.partial(hashed, opened))
            steps.append((writing.run(functools.partial(written, opened, batch_hashed)), buffer))
            while len(steps) > 2:
                step, buffer = steps.popleft()
                step.result()
                free.append(buffer)  # opened: no thread reads it any more
        while steps:
            steps.popleft()[0].result()
    finally:
        _stopped(hashing, writing)  # no thread writes after this
    return digest.hexdigest()


def _stopped(*lanes: Lane) -> None:
    for lane in lanes:
        lane.stop()


def _unsealed_into(target: Path, source: ReadsInto, stored: int, data_key: bytes) -> str:
    """`unseal` into a new file at `target` (blocking)."""
    _make_parent(target)
    with open(target, "wb") as out:
        return unseal(source, stored, data_key, out)


def _fill(source: ReadsInto, view: memoryview) -> None:
    """Read all of `view` from `source` (blocking); a source that ends first sent less
    than the object it announced."""
    got = 0
    while got < len(view):
        if not (more := source.readinto(view[got:])):
            raise IntegrityError(f"truncated: the object ended {len(view) - got} bytes early")
        got += more


def _exactly(source: ReadsInto, n: int) -> bytearray:
    """The next `n` bytes of `source` (blocking)."""
    buffer = bytearray(n)
    _fill(source, memoryview(buffer))
    return buffer


def _data_key(rel: str, header: str | None) -> bytes:
    """The object's data key, from the header the datacache sent it in."""
    try:
        if header:
            return base64.b64decode(header, validate=True)
    except binascii.Error:
        pass
    raise DataUnavailable(f"the datacache sent {rel} without its key")


def _said(said: str) -> str:
    """What the datacache said when it refused: its JSON error's detail, else the text."""
    try:
        return _detail(json.loads(said))
    except ValueError:
        return said


def _make_parent(target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)


def _place_whole(raw: bytes, data_key: bytes, target: Path) -> str:
    """Open a sealed object that arrived whole and write it to `target`, all in one trip
    to a worker thread (blocking); its SHA-256. Nothing is written unless every segment
    authenticates."""
    header = Header.parse(raw)
    opener = Opener.with_key(header, data_key)
    last = opener.segments(len(raw)) - 1
    plain = opener.open_run(memoryview(raw)[len(header.raw) :], 0, last + 1, last)
    _make_parent(target)
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for segment in plain:
            digest.update(segment)
            out.write(segment)
    return digest.hexdigest()


async def _read_file(path: Path) -> AsyncIterator[bytes]:
    fd = await acquired(lambda: os.open(path, os.O_RDONLY | os.O_NOFOLLOW), os.close)
    with os.fdopen(fd, "rb") as src:
        while chunk := await asyncio.to_thread(src.read, CHUNK):
            yield chunk


def _detail(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("detail"))
    return str(body)
