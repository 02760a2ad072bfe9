"""The services on a replica-set URL, as a production installation gives them: the
database server runs as the one member of a replica set, the URL names the set, and a
job goes through every service with its audit trail intact."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from shared.auth import Role
from shared.settings import AmqpSettings, MongoSettings
from tests.e2e.support import all_records, client, instant_stack, spec, wait_state
from tests.helpers import eventually, make_token

pytestmark = pytest.mark.slow


async def test_a_job_runs_and_is_audited_with_a_replica_set_url(
    replica_set_url: str, amqp_settings: AmqpSettings, db_prefix: str, tmp_path: Path
) -> None:
    mongo = MongoSettings(url=SecretStr(replica_set_url), identity_db=f"{db_prefix}identity")
    user_token = await make_token(mongo, "radiology", Role.user)
    operator_token = await make_token(mongo, "ops", Role.operator)
    amqp_url = amqp_settings.url.get_secret_value()
    async with (
        instant_stack(amqp_url, mongo, db_prefix, tmp_path) as stack,
        client(stack, user_token) as api,
        client(stack, operator_token) as ops,
    ):
        job = await api.submit(spec("on-a-replica-set", "true"))
        done = await wait_state(api, job["id"])
        assert done["state"] == "succeeded"

        async def trail() -> list[str]:
            types = [r["type"] for r in await all_records(ops) if r["job_id"] == job["id"]]
            return types if "job.succeeded" in types else []

        assert "job.submitted" in await eventually(trail)
        assert (await ops.verify())["ok"]
