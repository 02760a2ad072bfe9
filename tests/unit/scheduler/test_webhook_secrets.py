"""Webhooks' signing secrets at rest, and the events a webhook may ask for."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook

from services.scheduler.webhooks import JOB_EVENTS, SecretBox, known_event, new_secret


def key() -> SecretStr:
    return SecretStr(base64.b64encode(os.urandom(32)).decode())


def test_a_secret_is_a_standard_webhooks_secret() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    signature = Webhook(secret).sign("msg_1", datetime.now(UTC), "{}")
    assert signature.startswith("v1,")


def test_a_sealed_secret_opens_only_with_its_key_and_for_its_webhook() -> None:
    box, secret = SecretBox.from_setting(key()), new_secret()
    sealed = box.seal("wh-1", secret)
    assert set(sealed) == {"sealed"} and secret.encode() not in sealed["sealed"]
    assert box.open("wh-1", sealed) == secret
    with pytest.raises(ValueError, match="does not open"):
        box.open("wh-2", sealed)  # copied onto another webhook
    with pytest.raises(ValueError, match="does not open"):
        SecretBox.from_setting(key()).open("wh-1", sealed)
    with pytest.raises(ValueError, match="no webhook_secret_key"):
        SecretBox(None).open("wh-1", sealed)


def test_without_a_key_secrets_are_kept_as_they_are_and_stay_readable_with_one() -> None:
    secret = new_secret()
    stored = SecretBox(None).seal("wh-1", secret)
    assert stored == {"plain": secret}
    assert SecretBox.from_setting(key()).open("wh-1", stored) == secret


def test_the_key_setting_is_32_bytes_of_base64() -> None:
    for bad in ("not base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            SecretBox.from_setting(SecretStr(bad))


def test_webhooks_ask_for_job_events_that_the_catalog_has() -> None:
    assert "job.succeeded" in JOB_EVENTS and "job.interactive_ready" in JOB_EVENTS
    assert "job.duplicate" not in JOB_EVENTS  # about a command, not the job's state
    assert known_event("job.*") == "job.*"
    with pytest.raises(ValueError, match="unknown event"):
        known_event("data.staged")
