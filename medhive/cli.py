"""`medhive`: the command line of users and operators.

Talks to the job API (`MEDHIVE_API_URL`) and the audit API (`MEDHIVE_AUDIT_URL`) with
the token in `MEDHIVE_TOKEN` (or the file `token create --save` wrote). `token`,
`amqp-user`, `dead` (medhive/admin.py) and `up` are the administrator's tools and run
on the server itself.

One module because the commands here (but `schema export` and `up`, which only call
other modules) are a few lines each over the one `Client` that `_client` builds from
the global `--api-url`, `--audit-url` and `--token` options, and `parser()` names each
command function beside its arguments; the commands that talk to the database and
RabbitMQ directly are in medhive/admin.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from medhive import admin
from medhive.client import TERMINAL, ApiFailure, Client, default_token
from medhive.integrators import ManagementError

Command = Callable[[argparse.Namespace], Awaitable[int]]


def _client(args: argparse.Namespace) -> Client:
    return Client(args.api_url, args.audit_url, args.token or default_token())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _state_line(record: dict[str, Any]) -> str:
    payload = (record.get("envelope") or {}).get("payload", {})
    when = str(record.get("occurred_at", ""))[11:19]
    line = f"{when}  {payload.get('state', record.get('type')):<10}"
    if payload.get("reason"):
        line += f"  {payload['reason']}"
    return line


async def submit(args: argparse.Namespace) -> int:
    text = Path(args.file).read_text() if args.file != "-" else sys.stdin.read()
    spec = yaml.safe_load(text)
    async with _client(args) as client:
        job = await client.submit(spec)
        print(f"job {job['id']} {job['state']}")
        if not args.follow:
            return 0
        return await _follow(client, job["id"])


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _progress_line(payload: dict[str, Any]) -> str:
    """`staging  [#####.....] 12 files, 40.0 MiB (input ct)`: bytes so far, no total known
    up front for every source, so the bar turns rather than fills."""
    spin = "|/-\\"[payload["files"] % 4]
    return (
        f"  staging {spin} {payload['files']} files, {_size(payload['bytes'])} ({payload['input']})"
    )


async def _follow(client: Client, job_id: str) -> int:
    """Print each state change as audit stores it, staging progress as it goes (one line
    redrawn on a terminal), and at the end the output."""
    tty = sys.stdout.isatty()
    async for record in client.stream({"job": job_id}):
        type_ = str(record.get("type", ""))
        payload = (record.get("envelope") or {}).get("payload", {})
        if type_ == "data.progress":
            if tty:
                print("\r" + _progress_line(payload), end="", flush=True)
            continue
        if type_ == "data.fetched":
            line = (f"  fetched {payload['source']}: {payload['files']} files, "
                    f"{_size(payload['bytes'])} in {payload['seconds']:.1f} s")  # fmt: skip
            print(("\r\033[K" if tty else "") + line, flush=True)
            continue
        if type_ == "data.staged" and payload["cached"]:
            line = (f"  {payload['cached']} of {len(payload['inputs'])} inputs found in the "
                    "datacache: nothing fetched for them")  # fmt: skip
            print(("\r\033[K" if tty else "") + line, flush=True)
            continue
        if type_ == "job.interactive_ready":
            for name, where in payload["endpoints"].items():
                print(("\r\033[K" if tty else "") + f"  {name}: connect to {where}", flush=True)
            continue
        if not type_.startswith("job."):
            continue
        print(("\r\033[K" if tty else "") + _state_line(record), flush=True)
        if payload.get("state") in TERMINAL:
            break
    logs = await client.logs(job_id)
    for stream in ("stdout", "stderr"):
        if logs[stream]:
            print(f"--- {stream}{' (truncated)' if logs[f'{stream}_truncated'] else ''}")
            print(logs[stream], end="" if logs[stream].endswith("\n") else "\n")
    job = await client.job(job_id)
    if job.get("exit_code") is not None:
        print(f"exit code {job['exit_code']}")
    return 0 if job["state"] == "succeeded" else 1


async def jobs(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for job in await client.jobs(args.state, args.limit, args.name, args.tenant):
            tenant = f"  {job['tenant']}" if args.tenant else ""
            print(f"{job['id']}  {job['state']:<10}{tenant}  {job['name']}")
    return 0


async def status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        _print_json(await client.job(args.job_id))
    return 0


async def logs(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        body = await client.logs(args.job_id)
    sys.stdout.write(body["stdout"])
    sys.stderr.write(body["stderr"])
    return 0


async def cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.cancel(args.job_id)
    requested = " (cancel requested)" if job.get("cancel_requested") else ""
    print(f"job {job['id']} {job['state']}{requested}")
    return 0


async def outputs(args: argparse.Namespace) -> int:
    """List a job's results, or with -o download them, checking each SHA-256."""
    async with _client(args) as client:
        listing = await client.outputs(args.job_id)
        if args.output is None:
            for item in listing["files"]:
                print(f"{item['size']:>12}  {item['sha256'][:12]}  {item['path']}")
            if listing.get("upload"):
                upload = listing["upload"]
                print(f"upload to {upload['destination']}: {upload['detail']}")
            return 0
        base = Path(args.output)
        for item in listing["files"]:
            target = base / item["path"]
            if not target.resolve().is_relative_to(base.resolve()):
                raise ApiFailure(502, f"refusing output path {item['path']!r}")
            digest = await client.download(args.job_id, item["path"], target)
            if digest != item["sha256"]:
                raise ApiFailure(502, f"{item['path']} arrived damaged (SHA-256 differs)")
            print(target)
    return 0


async def nodes(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for node in await client.nodes():
            state = "online" if node["online"] else "offline"
            print(
                f"{node['id']}  {state:<7}  cpus {node['free_cpus']:g}/{node['cpus']:g}  "
                f"memory {node['free_memory_mb']}/{node['memory_mb']} MiB"
            )
    return 0


def _brief(record: dict[str, Any]) -> str:
    """One audit record on one line: time, type, job, then the payload's own fields
    (`medhive audit tail --brief`, for people; the default JSON is for programs)."""
    payload = (record.get("envelope") or {}).get("payload", {})
    fields = " ".join(
        f"{key}={json.dumps(value) if isinstance(value, (dict, list)) else value}"
        for key, value in payload.items()
        if key != "job_id" and value not in (None, [], {})
    )
    when = str(record.get("occurred_at", ""))[11:19]
    job = record.get("job_id") or "-"
    return f"{record.get('seq', ''):>6}  {when}  {record['type']:<22} {job}  {fields}"


QUOTAS = ("max_running_cpus", "max_running_memory_mb", "max_running_jobs", "max_queued_jobs")


async def tenants(args: argparse.Namespace) -> int:
    """Each tenant's share, usage and what it holds and queues against its quota."""
    async with _client(args) as client:
        listing = await client.tenants()
    print(f"{'tenant':<16} {'share':>6} {'usage cpu-h':>11} {'load':>8}  running (quota)"
          f"{'':<26} queued (quota)")  # fmt: skip
    for t in listing["tenants"]:
        quota = t["quota"]

        def of(value: float, limit: float | None) -> str:
            return f"{value:g}/{limit:g}" if limit is not None else f"{value:g}"

        running = (f"cpus {of(t['running_cpus'], quota['max_running_cpus'])}, "
                   f"MiB {of(t['running_memory_mb'], quota['max_running_memory_mb'])}, "
                   f"jobs {of(t['running_jobs'], quota['max_running_jobs'])}")  # fmt: skip
        print(f"{t['tenant']:<16} {t['share']:>6g} {t['usage_cpu_s'] / 3600:>11.2f} "
              f"{t['load']:>8.3f}  {running:<41} "
              f"{of(t['queued_jobs'], quota['max_queued_jobs'])}")  # fmt: skip
    print(f"(usage decays with a half-life of {listing['half_life_s'] / 3600:g} h)")
    return 0


async def tenants_set(args: argparse.Namespace) -> int:
    """Set a tenant's share and quota: what is not given is no limit (share 1)."""
    policy = {"share": args.share, "quota": {q: getattr(args, q) for q in QUOTAS}}
    async with _client(args) as client:
        _print_json(await client.set_tenant(args.tenant, policy))
    return 0


async def webhooks_add(args: argparse.Namespace) -> int:
    """Register a webhook for your tenant; prints it with its signing secret."""
    async with _client(args) as client:
        webhook = await client.add_webhook(args.url, args.events)
    _print_json(webhook)
    print("keep the secret: it is shown only now", file=sys.stderr)
    return 0


async def webhooks_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for webhook in await client.webhooks():
            print(f"{webhook['id']}  {','.join(webhook['events'])}  {webhook['url']}")
    return 0


async def webhooks_remove(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        removed = await client.remove_webhook(args.webhook_id)
    print(f"removed {removed['id']} ({removed['url']})")
    return 0


async def webhooks_test(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        queued = await client.test_webhook(args.webhook_id)
    print(f"queued {queued['delivery_id']} to {queued['webhook_id']}")
    return 0


async def audit_tail(args: argparse.Namespace) -> int:
    filters: dict[str, str] = {
        "job": args.job or "",
        "type": args.type or "",
        "tenant": args.tenant or "",
    }
    show = _brief if args.brief else partial(json.dumps, sort_keys=True)
    async with _client(args) as client:
        if args.follow:
            async for record in client.stream(filters):
                print(show(record), flush=True)
            return 0
        after = 0
        while True:
            records, next_after = await client.events(filters, after)
            for record in records:
                print(show(record))
            if next_after is None:
                return 0
            after = next_after


async def audit_verify(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        result = await client.verify()
    _print_json(result)
    return 0 if result["ok"] else 1


async def schema_export(args: argparse.Namespace) -> int:
    from medhive.openapi import export_openapi
    from shared.schema import export_schemas

    for path in [*export_schemas(Path(args.directory)), *export_openapi(Path(args.directory))]:
        print(path)
    return 0


async def up(args: argparse.Namespace) -> int:
    from medhive.up import run_stack

    return await run_stack(args.services or None, db_path=args.db_path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medhive", description=__doc__.splitlines()[0])
    p.add_argument("--api-url", default=os.environ.get("MEDHIVE_API_URL", "http://127.0.0.1:8080"))
    p.add_argument(
        "--audit-url", default=os.environ.get("MEDHIVE_AUDIT_URL", "http://127.0.0.1:8081")
    )
    p.add_argument("--token", help="API token (default: $MEDHIVE_TOKEN or the saved one)")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn: Command, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_)
        cmd.set_defaults(fn=fn)
        return cmd

    c = command("submit", submit, "submit a job description (YAML or JSON)")
    c.add_argument("file", help="job file, or - for standard input")
    c.add_argument("--follow", "-f", action="store_true", help="show states live, then output")
    c = command("jobs", jobs, "list your jobs")
    c.add_argument("--state")
    c.add_argument("--name", help="only jobs whose name starts so")
    c.add_argument("--tenant", help="operators: this tenant's jobs, or '*' for every tenant's")
    c.add_argument("--limit", type=int, default=50)
    command("status", status, "a job with its history").add_argument("job_id")
    command("logs", logs, "what a job printed").add_argument("job_id")
    command("cancel", cancel, "cancel a job").add_argument("job_id")
    c = command("outputs", outputs, "list a job's results, or download them with -o")
    c.add_argument("job_id")
    c.add_argument("-o", "--output", help="directory to download the results into")
    command("nodes", nodes, "nodes and their free capacity")
    c = command("tenants", tenants, "tenants: share, usage, quota (operators)")
    tenant_commands = c.add_subparsers(dest="tenants_command")
    c = tenant_commands.add_parser("set", help="set a tenant's share and quota (operators)")
    c.set_defaults(fn=tenants_set)
    c.add_argument("tenant")
    c.add_argument("--share", type=float, default=1.0, help="weight in fair share (default 1)")
    for quota in QUOTAS:
        kind = int if quota.endswith(("_mb", "_jobs")) else float
        c.add_argument(f"--{quota.replace('_', '-')}", dest=quota, type=kind, help="a limit")

    hooks = sub.add_parser("webhooks", help="your tenant's webhooks").add_subparsers(
        dest="webhooks_command", required=True
    )
    c = hooks.add_parser("add", help="send job events to a URL (signed, Standard Webhooks)")
    c.set_defaults(fn=webhooks_add)
    c.add_argument("url", help="https://... (http:// only to hosts the operator allows)")
    c.add_argument(
        "--event", dest="events", action="append", required=True,
        help="a job event, e.g. job.succeeded, or job.* for all; repeat for more",
    )  # fmt: skip
    hooks.add_parser("list", help="your webhooks").set_defaults(fn=webhooks_list)
    c = hooks.add_parser("remove", help="remove a webhook")
    c.set_defaults(fn=webhooks_remove)
    c.add_argument("webhook_id")
    c = hooks.add_parser("test", help="send a webhook.test message to a webhook")
    c.set_defaults(fn=webhooks_test)
    c.add_argument("webhook_id")

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="audit_command", required=True
    )
    c = audit.add_parser("tail", help="audit records, oldest first")
    c.set_defaults(fn=audit_tail)
    c.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    c.add_argument("--job")
    c.add_argument("--type", help="type prefix, e.g. job. or data.")
    c.add_argument("--tenant")
    c.add_argument("--brief", action="store_true", help="one line per record, for people")
    audit.add_parser("verify", help="check the hash chain").set_defaults(fn=audit_verify)

    admin.add_commands(sub)

    schema = sub.add_parser("schema", help="message schemas").add_subparsers(
        dest="schema_command", required=True
    )
    c = schema.add_parser("export", help="write JSON Schema and AsyncAPI files")
    c.set_defaults(fn=schema_export)
    c.add_argument("directory")

    c = command("up", up, "run the services of one machine, logs interleaved")
    c.add_argument(
        "services",
        nargs="*",
        help="which services (default: every one this machine can run, said at start)",
    )
    c.add_argument(
        "--db-path",
        default=os.environ.get("MEDHIVE_DB_PATH", "/var/lib/medhive/db"),
        help="start a MongoDB-protocol server on this path when none answers",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code = asyncio.run(args.fn(args))
    except ApiFailure as exc:
        print(f"medhive: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except (OSError, yaml.YAMLError, ValueError, ManagementError) as exc:
        # ValueError: a name that may not name a tenant or user (shared/identity.py)
        print(f"medhive: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
