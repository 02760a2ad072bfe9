"""Real servers as fixtures: one RabbitMQ and one MongoDB-protocol server per run,
isolated per test by a fresh vhost and fresh database names.

RabbitMQ and dockerd are started by `scripts/setup.sh` (the test command runs it
first); the MongoDB-protocol server is started here, as its own process, so that its
work does not share the test's interpreter.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from pymongo.asynchronous.database import AsyncDatabase
from yarl import URL

from medhive import integrators, localdb
from shared.bus import Bus
from shared.identity import AmqpUsers
from shared.mongo import Document, connect
from shared.settings import AmqpSettings, MongoSettings
from tests.helpers import connected_bus

#: Fixtures of the stand-in XNAT server and the real PACS (Orthanc), for every test tree.
pytest_plugins = ["tests.fixtures.xnat", "tests.fixtures.orthanc", "tests.fixtures.vmnet"]

RABBIT_HOST = os.environ.get("MEDHIVE_TEST_RABBIT_HOST", "127.0.0.1")
RABBIT_ADMIN = os.environ.get("MEDHIVE_TEST_RABBIT_ADMIN", "medhive:medhive")
MANAGEMENT = f"http://{RABBIT_HOST}:15672/api"
TEST_IMAGE = os.environ.get("MEDHIVE_TEST_IMAGE", "medhive/busybox:1")


def rabbit_api(
    method: str, path: str, body: object | None = None, base: str = MANAGEMENT
) -> object:
    """Call RabbitMQ's management API (the system broker's unless `base` says) as the
    administrator."""
    request = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            "authorization": "Basic " + base64.b64encode(RABBIT_ADMIN.encode()).decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh RabbitMQ vhost, deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    rabbit_api("PUT", f"/vhosts/{name}")
    user = RABBIT_ADMIN.split(":", 1)[0]
    rabbit_api(
        "PUT", f"/permissions/{name}/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    yield name
    # A test that restarted the broker may leave it briefly unreachable.
    with contextlib.suppress(urllib.error.URLError):
        rabbit_api("DELETE", f"/vhosts/{name}")


@pytest.fixture
def amqp_settings(vhost: str) -> AmqpSettings:
    return AmqpSettings(url=SecretStr(f"amqp://{RABBIT_ADMIN}@{RABBIT_HOST}:5672/{vhost}"))


@pytest.fixture
async def amqp_user(
    amqp_settings: AmqpSettings, mongo_settings: MongoSettings
) -> AsyncIterator[tuple[str, str]]:
    """An AMQP user of another hospital system, for tenant `radiology`, made as an
    operator makes one (`medhive amqp-user add`), with exactly those permissions."""
    name = f"hospital-{uuid.uuid4().hex[:8]}"
    async with provisioning(amqp_settings, mongo_settings) as (api, users):
        url = await integrators.add(api, users, name, "radiology")
    yield name, str(URL(url).password)
    with contextlib.suppress(urllib.error.URLError):
        rabbit_api("DELETE", f"/users/{name}")


@pytest.fixture
def broad_user(vhost: str) -> Iterator[tuple[str, str]]:
    """An AMQP user that may publish anything (a misconfigured account): what the
    services refuse by themselves when the broker's permissions would let it through."""
    name, password = f"broad-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    rabbit_api("PUT", f"/users/{name}", {"password": password, "tags": ""})
    rabbit_api(
        "PUT", f"/permissions/{vhost}/{name}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    yield name, password
    with contextlib.suppress(urllib.error.URLError):
        rabbit_api("DELETE", f"/users/{name}")


@contextlib.asynccontextmanager
async def provisioning(
    amqp: AmqpSettings, mongo: MongoSettings
) -> AsyncIterator[tuple[integrators.Management, AmqpUsers]]:
    """What `medhive amqp-user` works with: the management API and the identity store."""
    client = connect(mongo)
    try:
        async with integrators.Management(amqp) as api:
            yield api, AmqpUsers(client[mongo.identity_db], [amqp.user], cache_s=0)
    finally:
        await client.close()


@contextlib.contextmanager
def local_mongo(storage: Path, *, standalone: bool = True) -> Iterator[int]:
    """A SecantusDB server in its own process, keeping its data under `storage`; its port."""
    port = free_port()
    log = (storage / "server.log").open("w")
    process = subprocess.Popen(
        localdb.argv("127.0.0.1", port, str(storage / "data"), standalone=standalone),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((storage / "server.log").read_text()) from None
            time.sleep(0.1)  # polling a port that has no event to wait on
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A MongoDB wire-protocol server (SecantusDB) in its own process for the run."""
    with local_mongo(tmp_path_factory.mktemp("secantus")) as port:
        yield f"mongodb://127.0.0.1:{port}/"


@pytest.fixture(scope="session")
def replica_set_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same server as the one member of a replica set, and the URL that says so (as
    a production installation's does), for the tests that show such a URL works."""
    with local_mongo(tmp_path_factory.mktemp("secantus-rs"), standalone=False) as port:
        yield f"mongodb://127.0.0.1:{port}/?replicaSet={localdb.REPLICA_SET}"


@pytest.fixture
def db_prefix() -> str:
    """A unique prefix for the databases of one test."""
    return f"t{uuid.uuid4().hex[:10]}_"


@pytest.fixture
def mongo_settings(mongo_url: str, db_prefix: str) -> MongoSettings:
    return MongoSettings(url=SecretStr(mongo_url), identity_db=f"{db_prefix}identity")


@pytest.fixture
async def database(
    mongo_settings: MongoSettings, db_prefix: str
) -> AsyncIterator[AsyncDatabase[Document]]:
    """A database of this test's own, for stores tested without their service."""
    client = connect(mongo_settings)
    yield client[f"{db_prefix}store"]
    await client.close()


@pytest.fixture
async def bus(amqp_settings: AmqpSettings) -> AsyncIterator[Bus]:
    """A bus on the test's vhost, as the service account (the one the services trust),
    for the side of the protocol the test plays: a node, the scheduler, any publisher."""
    async with connected_bus(amqp_settings, "test@here") as bus:
        yield bus
