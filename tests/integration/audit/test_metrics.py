"""The audit's `/metrics`: records stored (valid or not, a repeat once), ingest lag, the
chain's head; and who may read them."""

from __future__ import annotations

from typing import Any

import aio_pika

from shared.auth import Role
from shared.bus import Bus
from shared.messages.catalog import COMMANDS
from shared.messages.jobs import JobEvent, JobState
from tests.integration.audit.conftest import StartApp
from tests.integration.audit.support import auth, stored
from tests.scrape import scrape, scrape_until, status_of


async def test_metrics_count_the_records_stored_and_how_late_they_were(
    start_app: StartApp, bus: Bus, records: Any, token: Any
) -> None:
    client = await start_app()
    url = client.make_url("/metrics")
    reader = await token("_metrics", Role.metrics)
    before = await scrape(url, reader)
    assert before.value("medhive_audit_records_stored_total") == 0
    assert before.value("medhive_audit_head_seq") == 0

    for n in range(3):
        event = JobEvent(job_id=f"job-{n}", state=JobState.queued)
        envelope = await bus.emit("job.queued", event, correlation_id=f"job-{n}", tenant="t1")
    await bus.publish(envelope)  # a publisher that lost the confirm sends it again
    channel = await bus.connection.channel(publisher_confirms=True)
    commands = await channel.get_exchange(COMMANDS)
    await commands.publish(aio_pika.Message(b"{not json", message_id="bad-1"), "job.submit")
    await stored(records, 4)

    after = await scrape_until(
        url, reader, lambda s: s.value("medhive_audit_records_stored_total") == 4
    )
    assert after.value("medhive_audit_records_stored_total", valid="true") == 3
    assert after.value("medhive_audit_records_stored_total", valid="false") == 1
    assert after.value("medhive_audit_ingest_lag_seconds_count") == 4
    assert 0 < after.value("medhive_audit_ingest_lag_seconds_sum") < 60
    assert after.value("medhive_audit_head_seq") == 4
    assert after.value("medhive_audit_backlog_messages") == 0


async def test_metrics_need_a_metrics_or_operator_token_which_reads_nothing_else(
    start_app: StartApp, token: Any
) -> None:
    client = await start_app()
    url = client.make_url("/metrics")
    metrics = auth(await token("_metrics", Role.metrics))
    assert await status_of(url, {}) == 401
    assert await status_of(url, auth(await token("radiology"))) == 403
    assert await status_of(url, auth(await token("ops", Role.operator))) == 200
    assert await status_of(url, metrics) == 200
    assert await status_of(client.make_url("/v1/events"), metrics) == 403
