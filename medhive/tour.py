"""`python -m medhive.tour prepare|run`: the tour of the platform that `scripts/demo.sh`
gives a newcomer after its first container job.

`prepare` (before the services start, so that they find what it made; idempotent):
- a PACS: Orthanc in its own network namespace (`medhive.localpacs`), holding a small
  synthetic study made here with pydicom: three series, one uncompressed, one RLE and
  one JPEG baseline; made once, found again on later runs;
- the datacache's sources file `sources.yaml` in the state directory, naming that PACS
  for tenant `demo` with its password (only if the file is absent or is the demo's own:
  an operator's file is never overwritten);
- the demo's VM network (`medhive.localnet.DEMO`), which `medhive up` finds and gives
  to netgw and to the node agent; a blank disk for the test guest;
- the tour's job files, in `demo/` under the state directory.
It says with exit code 3 when it changed what running services read at start (the
sources file): `scripts/demo.sh` then restarts the stack it started.

`run` (once the services run): three steps. Each says what it shows, prints the command
that repeats it, runs that command as a user would, and checks what it must show; the
tour stops with exit code 1 at the first step whose outcome is not seen.
1. a data job: the study staged from the PACS through the datacache, read by a
   container (SHA-256 and DICOM tags of each file), a summary downloaded with
   `medhive outputs`; then the same job again, which fetches nothing;
2. a VM job with an interactive port: the lease and the forward, a connection through
   the gateway to the guest's banner, the job cancelled, the port refused afterwards;
3. the audit of it all, then the chain's verification.

One module because `run` checks exactly what `prepare` made: the study's SHA-256s that
`_study` saved in `study.json`, the job files `_jobs` wrote, and the guest's port and
banner; the two halves share those files and constants and change together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

from medhive import localpacs
from medhive.client import Client, default_token
from medhive.localnet import CLIENT_IP, DEMO
from medhive.localpacs import Orthanc
from medhive.synthetic import make_instance

STATE = Path(os.environ.get("MEDHIVE_STATE_DIR", "/var/lib/medhive"))
DEMO_DIR = STATE / "demo"
GUEST_DIR = Path(os.environ.get("MEDHIVE_GUEST_DIR", "/var/lib/medhive/guest"))
TENANT = "demo"
READER_IMAGE = "medhive/dicom-reader:1"
#: The demo study: (series description, transfer syntax, instances).
SERIES = [
    ("uncompressed", ExplicitVRLittleEndian, 3),
    ("RLE lossless", RLELossless, 3),
    ("JPEG baseline", JPEGBaseline8Bit, 2),
]
SOURCES_MARK = "# Written by medhive's demo (python -m medhive.tour prepare)."
GUEST_PORT = 2222
GUEST_BANNER = b"medhive-guest ready"
CHANGED = 3
#: A line of the guest kernel on its serial console, which is the VM job's log.
KERNEL_LINE = re.compile(r"^\[ *\d+\.\d+\] ")
VM_WITHIN_S = 300


class StepFailed(Exception):
    """What a step had to show and did not."""


# --- prepare ---------------------------------------------------------------------


def _study(server: Orthanc) -> dict[str, Any]:
    """The demo study in the PACS: the one made on an earlier run if the PACS still has
    it, else a new one. Returns its UID and each instance's SHA-256 as the PACS serves
    it (what the job must see, byte for byte)."""
    saved = DEMO_DIR / "study.json"
    if saved.exists():
        study = json.loads(saved.read_text())
        found = json.loads(
            server.request("POST", "/tools/lookup", study["uid"].encode(), "text/plain")
        )
        if found:
            return dict(study)
    uid, sha256 = generate_uid(), {}
    for description, syntax, count in SERIES:
        series_uid = generate_uid()
        for number in range(1, count + 1):
            raw = make_instance("DEMO-0001", uid, series_uid, number, syntax)
            stored = json.loads(server.request("POST", "/instances", raw))
            served = server.request("GET", f"/instances/{stored['ID']}/file")
            sha256[stored["ID"]] = {
                "sha256": hashlib.sha256(served).hexdigest(),
                "series": description,
            }
    study = {"uid": uid, "instances": sha256}
    saved.write_text(json.dumps(study, indent=2))
    return study


def _source_uri(server: Orthanc) -> str:
    return f"dicomweb+http://{server.host}:{server.http_port}"


def _sources(server: Orthanc) -> bool:
    """Write the sources file unless an operator's own is there; whether it changed."""
    path = STATE / "sources.yaml"
    entry = {"tenant": TENANT, "match": _source_uri(server),
             "username": server.username, "password": server.password}  # fmt: skip
    text = f"{SOURCES_MARK}\n" + yaml.safe_dump({"sources": [entry]}, sort_keys=False)
    if path.exists():
        current = path.read_text()
        if not current.startswith(SOURCES_MARK):
            print(f"[tour] {path} is an operator's own: for the tour it must name "
                  f"{entry['match']} for tenant {TENANT} (see {DEMO_DIR / 'orthanc'})")  # fmt: skip
            return False
        if current == text:
            return False
    path.touch(mode=0o600)  # it holds the PACS's password
    path.write_text(text)
    return True


def _jobs(server: Orthanc, study: dict[str, Any]) -> None:
    """The tour's two job files, written where the printed commands name them."""
    data_job = {
        "name": "read-demo-study",
        "image": READER_IMAGE,
        "command": ["dicom-reader", "/data/study", "/outputs"],
        "inputs": [
            {
                "name": "study",
                "source": f"{_source_uri(server)}/dicom-web/studies/{study['uid']}",
                "path": "/data/study",
            }
        ],
        "outputs": {"max_mb": 4},
        "resources": {"cpus": 0.5, "memory_mb": 256},
        "walltime_s": 300,
        "labels": {"purpose": "demo"},
    }
    vm_job = {
        "kind": "vm",
        "name": "interactive-guest",
        "image": str(DEMO_DIR / "guest.qcow2"),
        "vm": {
            "kernel": str(GUEST_DIR / "vmlinuz"),
            "initrd": str(GUEST_DIR / "initrd.img"),
            # the test guest: an address by DHCP, a banner on the port, then it stays up
            "cmdline": f"medhive.serve={GUEST_PORT} medhive.sleep=inf",
            "interactive": [{"name": "ssh", "port": GUEST_PORT}],
        },
        "resources": {"cpus": 1, "memory_mb": 256},
        "walltime_s": 900,
        "labels": {"purpose": "demo"},
    }
    for name, job in (("study-job.yaml", data_job), ("vm-job.yaml", vm_job)):
        (DEMO_DIR / name).write_text(yaml.safe_dump(job, sort_keys=False))


def prepare() -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    server = localpacs.ensure_orthanc(DEMO_DIR / "orthanc")
    study = _study(server)
    instances = len(study["instances"])
    print(f"[tour] PACS: Orthanc at {server.url} (namespace {localpacs.DEMO_LINK.netns}), "
          f"study {study['uid']} of {instances} instances")  # fmt: skip
    changed = _sources(server)
    DEMO.ensure()
    print(f"[tour] VM network: gateway namespace {DEMO.gateway_ns}, guests on {DEMO.uplink}, "
          f"users in namespace {DEMO.client_ns}")  # fmt: skip
    disk = DEMO_DIR / "guest.qcow2"
    if not disk.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    _jobs(server, study)
    return CHANGED if changed else 0


# --- run -------------------------------------------------------------------------


@dataclass
class Tour:
    api: Client
    operator: Client
    operator_token: str

    def medhive(self, *args: str, operator: bool = False) -> list[str]:
        """The command line of `medhive args`, as printed and as run."""
        token = ["--token", self.operator_token] if operator else []
        return [sys.executable, "-m", "medhive", *token, *args]


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _show(argv: list[str], secret: str | None = None) -> None:
    """Print the command a person types to repeat this (a token by its variable's name)."""
    shown = ["medhive", *argv[3:]] if argv[:3] == [sys.executable, "-m", "medhive"] else argv
    words = ['"$OPERATOR"' if word == secret else shlex.quote(word) for word in shown]
    print("$ " + " ".join(words), flush=True)


def _run(argv: list[str], secret: str | None = None, check: bool = True) -> str:
    """Run a command as shown, its output passed through and returned."""
    _show(argv, secret)
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, end="", flush=True)
    if check and done.returncode != 0:
        raise StepFailed(f"`{shlex.join(argv[3:])}` exited with {done.returncode}")
    return done.stdout


def _explain(text: str) -> None:
    print(inspect.cleandoc(text), flush=True)


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise StepFailed(what)
    print(f"   ok: {what}", flush=True)


async def data_job(tour: Tour) -> str:
    _say("1/3 A data job: a study from the PACS, staged encrypted, read by a container")
    _explain(
        """
        The datacache fetches the study over DICOMweb from the PACS (Orthanc, in its own
        network namespace), encrypts it at rest, and lets the job's node read it only while
        the job runs. The container (no network, read-only root, non-root) prints each
        file's SHA-256 and the DICOM tags it sees, and writes a summary to /outputs.
        (On a later run of the demo the study is in the datacache already.)
        """
    )
    study = json.loads((DEMO_DIR / "study.json").read_text())
    job_file = str(DEMO_DIR / "study-job.yaml")
    shown = _run(tour.medhive("submit", job_file, "--follow"))
    job_id = shown.split()[1]
    printed = (await tour.api.logs(job_id))["stdout"]
    expected = {item["sha256"] for item in study["instances"].values()}
    seen = f"the container saw all {len(expected)} instances, byte for byte as the PACS holds them"
    _expect(all(sha in printed for sha in expected), seen)
    results = DEMO_DIR / "results" / job_id
    listed = _run(tour.medhive("outputs", job_id, "-o", str(results)))
    _expect("summary.json" in listed, f"its summary downloaded to {results}, SHA-256 checked")

    _say("1/3 ... the same job again: the study is in the datacache, nothing is fetched")
    again = _run(tour.medhive("submit", job_file, "--follow"))
    second = again.split()[1]
    records, _ = await tour.api.events({"job": second, "type": "data."})
    types = [record["type"] for record in records]
    _expect("data.fetched" not in types and "inputs found in the datacache" in again,
            "the second job fetched nothing from the PACS")  # fmt: skip
    return job_id


async def vm_job(tour: Tour) -> str:
    _say("2/3 A VM job with an interactive port, reached through the gateway")
    _explain(
        f"""
        The node agent boots the test guest with libvirt/QEMU; netgw leases it a MAC and
        an address (dnsmasq) and forwards a port of the gateway's external address to its
        port 2222 (nftables), only while the job runs. The gateway and a user outside it
        live in network namespaces ({DEMO.gateway_ns}, {DEMO.client_ns}): the host's own
        network is untouched. The guest answers with a banner.
        """
    )
    argv = tour.medhive("submit", str(DEMO_DIR / "vm-job.yaml"), "--follow")
    _show(argv)
    follow = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    assert follow.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(VM_WITHIN_S):
            while not (lines and "connect to" in lines[-1]):
                line = (await follow.stdout.readline()).decode()
                if not line:
                    raise StepFailed(f"the VM job ended before its port was ready: {lines}")
                print(line, end="", flush=True)
                lines.append(line.rstrip())
    except TimeoutError:
        raise StepFailed(f"no interactive port within {VM_WITHIN_S} s") from None
    job_id = lines[0].split()[1]
    host, port = lines[-1].rsplit(" ", 1)[1].split(":")
    _run(tour.medhive("audit", "tail", "--brief", "--job", job_id, "--type", "net."))
    nc = ["ip", "netns", "exec", DEMO.client_ns, "busybox", "nc", host, port]
    print(f"(from the user's side, {CLIENT_IP} in namespace {DEMO.client_ns})")
    banner = _run(nc)
    _expect(GUEST_BANNER.decode() in banner, "the guest answered through the forwarded port")
    _run(tour.medhive("cancel", job_id))
    rest = (await asyncio.wait_for(follow.communicate(), 120))[0].decode()
    console = [line for line in rest.splitlines() if not KERNEL_LINE.match(line)]
    print("\n".join(console), flush=True)
    print(f"(the guest kernel's own lines left out: `medhive logs {job_id}` has them all)")
    _expect("cancelled" in rest, "the job was cancelled")
    await _released(tour, job_id)
    refused = _run(nc, check=False)
    _expect("refused" in refused, "the port is closed now that the job has ended")
    return job_id


async def _released(tour: Tour, job_id: str) -> None:
    """Wait for netgw's `net.released` of the job: its forward is gone from then on."""
    stream = tour.api.stream({"job": job_id, "type": "net.released"})
    async with asyncio.timeout(120), contextlib.aclosing(stream) as records:
        async for _ in records:
            return


async def audit(tour: Tour, data_job_id: str, vm_job_id: str) -> None:
    _say("3/3 The audit: every command and event, in a hash chain")
    _explain(
        """
        What was read, by which node, how many bytes; the lease and the forward; each
        state. Operators see every tenant's records ($OPERATOR: an operator token, made by
        `medhive token create --tenant ops --role operator`).
        """
    )
    secret = tour.operator_token
    _run(tour.medhive("audit", "tail", "--brief", "--job", data_job_id, "--type", "data.",
                      operator=True), secret)  # fmt: skip
    records, _ = await tour.operator.events({"job": data_job_id, "type": "data.accessed"})
    read = sum(record["envelope"]["payload"]["bytes"] for record in records)
    _expect(read > 0, f"the node's reads are recorded: {len(records)} accesses, {read} bytes")
    _run(tour.medhive("audit", "tail", "--brief", "--job", vm_job_id, "--type", "net.",
                      operator=True), secret)  # fmt: skip
    verified = _run(tour.medhive("audit", "verify", operator=True), secret)
    _expect('"ok": true' in verified, "the chain verifies")


async def run(operator_token: str) -> int:
    api_url = os.environ.get("MEDHIVE_API_URL", "http://127.0.0.1:8080")
    audit_url = os.environ.get("MEDHIVE_AUDIT_URL", "http://127.0.0.1:8081")
    started = time.monotonic()
    async with (
        Client(api_url, audit_url, default_token()) as api,
        Client(api_url, audit_url, operator_token) as operator,
    ):
        tour = Tour(api, operator, operator_token)
        try:
            data_job_id = await data_job(tour)
            vm_job_id = await vm_job(tour)
            await audit(tour, data_job_id, vm_job_id)
        except StepFailed as exc:
            print(f"\n[tour] FAILED: {exc}", file=sys.stderr)
            return 1
    print(f"\n[tour] every step showed what it should, in {time.monotonic() - started:.0f} s")
    return 0


def main() -> int:
    # The docstring up to its note on the module's shape, which is for its readers.
    usage = (__doc__ or "").partition("\nOne module because")[0]
    parser = argparse.ArgumentParser(
        prog="python -m medhive.tour",
        description=usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare", help="the PACS, its study, the sources file, the VM network")
    run_parser = sub.add_parser("run", help="the three steps (the services must run)")
    run_parser.add_argument("--operator-token", default=os.environ.get("OPERATOR", ""))
    args = parser.parse_args()
    if args.step == "prepare":
        return prepare()
    return asyncio.run(run(args.operator_token))


if __name__ == "__main__":
    sys.exit(main())
