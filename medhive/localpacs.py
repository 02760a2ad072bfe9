"""A real PACS on this machine: Orthanc in a network namespace of its own, and synthetic
studies to fill it.

Orthanc binds every address (it has no bind option), so it runs inside a namespace,
reached over a veth pair on a link-local /30 that exists only on this machine: nothing
outside can reach it, and it reaches nothing. Its REST user has a password and the one
DICOM AE it knows is medhive's (`CALLING_AET`, at this side of the pair).

Two lifetimes share this code: `running_orthanc`, a throw-away server for a test or a
benchmark (a fresh namespace, removed afterwards), and `ensure_orthanc`, the demo's
server that stays up between runs (`scripts/demo.sh`; started again if it stopped).

The studies to fill it are made by `medhive.synthetic`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from medhive.localnet import present, sh
from medhive.processes import Child, spawn

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER = "medhive"
AET, CALLING_AET = "ORTHANC", "MEDHIVE"
HTTP_PORT, DICOM_PORT = 8042, 4242
#: Where Orthanc's configuration says the AE `MEDHIVE` takes C-STOREs (a C-MOVE's
#: destination): a storage SCP on this side of the veth pair.
MOVE_PORT = 11112
#: Throw-away servers take 169.254.1-249.x; the demo's server has this subnet.
DEMO_OCTET = 251
READY_WITHIN_S = 60
STOP_WITHIN_S = 15


@dataclass
class Orthanc:
    host: str
    password: str
    http_port: int = HTTP_PORT
    dicom_port: int = DICOM_PORT
    aet: str = AET
    calling_aet: str = CALLING_AET
    username: str = USER

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/dicom",
    ) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        pair = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def json(self, path: str) -> object:
        return json.loads(self.request("GET", path))

    def answers(self) -> bool:
        try:
            self.json("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return True


@dataclass(frozen=True)
class Link:
    """A namespace and the veth pair that reaches it: `outer` (address `ours`) here,
    `inner` (address `theirs`) inside, on a /30 of 169.254.`octet`.0."""

    netns: str
    outer: str
    inner: str
    octet: int

    @property
    def ours(self) -> str:
        return f"169.254.{self.octet}.1"

    @property
    def theirs(self) -> str:
        return f"169.254.{self.octet}.2"

    def exists(self) -> bool:
        return present({self.netns}, self.outer)

    def create(self) -> None:
        self.remove()  # a half-made pair from an interrupted run
        sh("ip", "netns", "add", self.netns)
        sh("ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
        sh("ip", "link", "set", self.inner, "netns", self.netns)
        sh("ip", "addr", "add", f"{self.ours}/30", "dev", self.outer)
        sh("ip", "link", "set", self.outer, "up")
        for args in (
            ["addr", "add", f"{self.theirs}/30", "dev", self.inner],
            ["link", "set", self.inner, "up"],
            ["link", "set", "lo", "up"],
        ):
            sh("ip", *args, netns=self.netns)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


def _configure(work: Path, link: Link, password: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "medhive-local-pacs",
        "HttpPort": HTTP_PORT,
        "DicomPort": DICOM_PORT,
        "DicomAet": AET,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "DicomModalities": {"medhive": [CALLING_AET, link.ours, MOVE_PORT]},
        "DicomCheckModalityHost": False,
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
    }
    path = work / "orthanc.json"
    path.touch(mode=0o600)  # it holds the password
    path.write_text(json.dumps(config))
    return path


def _start(work: Path, link: Link, password: str, detach: bool) -> Child:
    config = _configure(work, link, password)
    return spawn(
        "orthanc",
        ["ip", "netns", "exec", link.netns, ORTHANC, str(config)],
        log=work / "orthanc.log",
        new_session=detach,  # the demo's server outlives the script that started it
    )


def _wait_ready(server: Orthanc, process: Child) -> None:
    deadline = time.monotonic() + READY_WITHIN_S
    while not server.answers():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(process.tail(4000))
        time.sleep(0.05)  # polling a port: Orthanc gives no other sign of readiness


@contextmanager
def running_orthanc(work: Path) -> Iterator[Orthanc]:
    """A throw-away Orthanc in a fresh namespace, storage and log under `work` (the
    tests' PACS, and the benchmark's); everything is removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    link = Link(f"mh-pacs-{tag}", f"mhp{tag}a", f"mhp{tag}b", int(tag[:2], 16) % 249 + 1)
    link.create()
    process: Child | None = None
    try:
        server = Orthanc(host=link.theirs, password=uuid.uuid4().hex)
        process = _start(work, link, server.password, detach=False)
        _wait_ready(server, process)
        yield server
    finally:
        if process is not None:
            process.stop(STOP_WITHIN_S)
        link.remove()


DEMO_LINK = Link("medhive-pacs", "mhpacs0", "mhpacs1", DEMO_OCTET)


def ensure_orthanc(work: Path) -> Orthanc:
    """The demo's Orthanc, started if it does not answer: its namespace, storage and
    password stay across runs (the password is made once, kept in `work`, mode 0600)."""
    secret = work / "password"
    if not secret.exists():
        work.mkdir(parents=True, exist_ok=True)
        secret.touch(mode=0o600)
        secret.write_text(uuid.uuid4().hex)
    server = Orthanc(host=DEMO_LINK.theirs, password=secret.read_text().strip())
    if server.answers():
        return server
    if not DEMO_LINK.exists():
        DEMO_LINK.create()
    _stop_previous(work)
    process = _start(work, DEMO_LINK, server.password, detach=True)
    (work / "orthanc.pid").write_text(str(process.pid))
    _wait_ready(server, process)
    return server


def _stop_previous(work: Path) -> None:
    """An earlier demo Orthanc that no longer answers (hung, or its link was gone)."""
    pid_file = work / "orthanc.pid"
    if pid_file.exists():
        with suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(pid_file.read_text()), 9)
        pid_file.unlink()
