"""The broker's nodes as one setting: the URL's node first, then the others, each with
the URL's credentials and vhost; a node that is not `host:port` is refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import AmqpSettings


def test_the_other_nodes_take_the_urls_credentials_and_vhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDHIVE_AMQP_URL", "amqp://svc:secret@rabbit-1:5672/clinic")
    monkeypatch.setenv("MEDHIVE_AMQP_NODES", "rabbit-2:5672, rabbit-3:5673,")
    urls = [str(url) for url in AmqpSettings().urls]
    assert urls == [
        "amqp://svc:secret@rabbit-1:5672/clinic",
        "amqp://svc:secret@rabbit-2:5672/clinic",
        "amqp://svc:secret@rabbit-3:5673/clinic",
    ]


def test_without_other_nodes_there_is_the_url_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDHIVE_AMQP_NODES", "")
    settings = AmqpSettings()
    assert settings.nodes == []
    assert [str(url) for url in settings.urls] == [settings.url.get_secret_value()]


@pytest.mark.parametrize("node", ["rabbit-2", "rabbit-2:amqp", ":5672"])
def test_a_node_that_is_not_host_and_port_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, node: str
) -> None:
    monkeypatch.setenv("MEDHIVE_AMQP_NODES", f"rabbit-3:5672,{node}")
    with pytest.raises(ValidationError, match="is not host:port"):
        AmqpSettings()
