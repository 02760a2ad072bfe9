"""The administrator's commands, run on the server: API tokens, the AMQP users of other
hospital systems, and the dead-letter queue. They talk to the database, RabbitMQ and
its management API with the server's own settings (`MEDHIVE_MONGO_*`, `MEDHIVE_AMQP_*`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from medhive import integrators
from medhive.client import ApiFailure
from medhive.dead import dead_letters, describe
from shared.auth import Role, TokenStore
from shared.identity import AmqpUsers
from shared.mongo import connect
from shared.settings import AmqpSettings, MongoSettings


@asynccontextmanager
async def _amqp_users() -> AsyncIterator[AmqpUsers]:
    settings = MongoSettings()
    client = connect(settings)
    try:
        yield AmqpUsers(client[settings.identity_db], [AmqpSettings().user], cache_s=0)
    finally:
        await client.close()


async def token_create(args: argparse.Namespace) -> int:
    settings = MongoSettings()
    db = connect(settings)
    try:
        token = await TokenStore(db[settings.identity_db]).create(
            args.name or f"{args.tenant}-{args.role}", args.tenant, Role(args.role)
        )
    finally:
        await db.close()
    if args.save:
        path = Path(os.environ.get("MEDHIVE_TOKEN_FILE", "~/.config/medhive/token")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token + "\n")
        path.chmod(0o600)
    print(token)
    return 0


async def amqp_user_add(args: argparse.Namespace) -> int:
    async with integrators.Management(AmqpSettings()) as api, _amqp_users() as users:
        url = await integrators.add(api, users, args.name, args.tenant, args.host)
    print(url)
    return 0


async def amqp_user_list(args: argparse.Namespace) -> int:
    async with integrators.Management(AmqpSettings()) as api, _amqp_users() as users:
        rows = await integrators.listing(api, users)
    for row in rows:
        broker = "" if row["in_broker"] else "  (no RabbitMQ user)"
        print(
            f"{row['user']}  tenant {row['tenant']}  connections {row['connections']}  "
            f"queued events {row['queued_events']}{broker}"
        )
    return 0


async def amqp_user_remove(args: argparse.Namespace) -> int:
    async with integrators.Management(AmqpSettings()) as api, _amqp_users() as users:
        if not await integrators.remove(api, users, args.name):
            raise ApiFailure(404, f"no AMQP user {args.name!r}")
    print(f"removed {args.name}")
    return 0


async def amqp_user_rotate(args: argparse.Namespace) -> int:
    async with integrators.Management(AmqpSettings()) as api:
        url = await integrators.rotate_password(
            api, args.name, disconnect=args.disconnect, host=args.host
        )
    print(url)
    return 0


async def dead_list(args: argparse.Namespace) -> int:
    async with dead_letters(AmqpSettings()) as dead:
        for letter in await dead.take(args.limit):
            row = describe(letter)
            print(
                f"{row['message_id']}  {row['type']}  from {row['user_id']}  "
                f"at {row['queue']}: {row['reason']}"
            )
    return 0


async def dead_show(args: argparse.Namespace) -> int:
    async with dead_letters(AmqpSettings()) as dead:
        for letter in await dead.take(args.limit):
            if letter.message_id == args.message_id:
                row = describe(letter)
                row["headers"] = {k: str(v) for k, v in (letter.headers or {}).items()}
                row["body"] = letter.body.decode("utf-8", "replace")
                print(json.dumps(row, indent=2))
                return 0
    raise ApiFailure(404, f"no letter {args.message_id!r} among the first {args.limit}")


async def dead_replay(args: argparse.Namespace) -> int:
    return await _settle(args, replay=True)


async def dead_purge(args: argparse.Namespace) -> int:
    if args.all:
        async with dead_letters(AmqpSettings()) as dead:
            print(f"purged {await dead.purge_all()} letters")
        return 0
    return await _settle(args, replay=False)


async def _settle(args: argparse.Namespace, *, replay: bool) -> int:
    """Replay or drop the named letters (or, with --all, every one taken)."""
    if not args.all and not args.message_ids:
        raise ApiFailure(400, "name letters by message id, or say --all")
    wanted = set(args.message_ids)
    done = 0
    async with dead_letters(AmqpSettings()) as dead:
        for letter in await dead.take(args.limit):
            if not args.all and letter.message_id not in wanted:
                continue
            if replay:
                await dead.replay(letter)
            else:
                await letter.ack()
            done += 1
    print(f"{'replayed' if replay else 'purged'} {done} letters")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The administrator's subcommands, on the CLI's parser."""
    token = sub.add_parser("token", help="API tokens").add_subparsers(
        dest="token_command", required=True
    )
    c = token.add_parser("create", help="create a token (on the server; MEDHIVE_MONGO_URL)")
    c.set_defaults(fn=token_create)
    c.add_argument("--tenant", required=True)
    c.add_argument("--role", choices=[role.value for role in Role], default="user")
    c.add_argument("--name", help="who holds it; for a node token, the node id")
    c.add_argument("--save", action="store_true", help="also write it where the CLI finds it")

    users = sub.add_parser(
        "amqp-user", help="AMQP users of other hospital systems (on the server)"
    ).add_subparsers(dest="amqp_user_command", required=True)
    c = users.add_parser("add", help="make a user for one tenant; prints its AMQP URL")
    c.set_defaults(fn=amqp_user_add)
    c.add_argument("name")
    c.add_argument("--tenant", required=True)
    c.add_argument("--host", help="broker address to put in the URL (default: this one's)")
    users.add_parser("list", help="users, tenants, connections").set_defaults(fn=amqp_user_list)
    c = users.add_parser("remove", help="delete a user; its connections are closed")
    c.set_defaults(fn=amqp_user_remove)
    c.add_argument("name")
    c = users.add_parser("rotate-password", help="a new password; prints the new URL")
    c.set_defaults(fn=amqp_user_rotate)
    c.add_argument("name")
    c.add_argument("--disconnect", action="store_true", help="also close open connections")
    c.add_argument("--host", help="broker address to put in the URL")

    dead = sub.add_parser("dead", help="the dead-letter queue (on the server)").add_subparsers(
        dest="dead_command", required=True
    )
    for name, fn, help_ in (
        ("list", dead_list, "letters, oldest first, with why"),
        ("show", dead_show, "one letter whole"),
        ("replay", dead_replay, "publish letters again where they first went"),
        ("purge", dead_purge, "drop letters"),
    ):
        c = dead.add_parser(name, help=help_)
        c.set_defaults(fn=fn)
        c.add_argument("--limit", type=int, default=1000, help="letters to look at")
        if name == "show":
            c.add_argument("message_id")
        elif name in ("replay", "purge"):
            c.add_argument("message_ids", nargs="*")
            c.add_argument("--all", action="store_true")
