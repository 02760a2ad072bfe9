"""The exported JSON Schemas and AsyncAPI document: complete, valid, and they check bodies."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.envelope import Envelope
from shared.messages.catalog import CATALOG, COMMANDS, EVENTS, TENANTS
from shared.messages.jobs import JobSpec, JobSubmit
from shared.schema import ASYNCAPI_FILE, ENVELOPE_FILE, export_schemas

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("schemas")
    export_schemas(directory)
    return directory


@pytest.fixture(scope="module")
def asyncapi(exported: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((exported / ASYNCAPI_FILE).read_text())
    return document


@pytest.fixture
def job_submit(exported: Path) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_load(exported, "job.submit"))


def _load(directory: Path, name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((directory / f"{name}.schema.json").read_text())
    return schema


def _refs(node: Any) -> list[str]:
    """Every `$ref` value anywhere in a JSON document."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    """Follow a local JSON pointer (`#/a/b`) inside `document`; KeyError if dangling."""
    assert ref.startswith("#/"), f"{ref} is not a local reference"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _job_submit_body(**spec: Any) -> dict[str, Any]:
    """A `job.submit` body built the way a Python sender builds it, `spec` overridden."""
    payload = JobSubmit(spec=JobSpec(name="x", image="i")).model_dump(mode="json")
    payload["spec"].update(spec)
    body: dict[str, Any] = json.loads(
        Envelope(id=uuid.uuid4(), type="job.submit", payload=payload).model_dump_json()
    )
    return body


def test_export_writes_one_file_per_catalog_type_plus_envelope_and_asyncapi(
    tmp_path: Path,
) -> None:
    written = export_schemas(tmp_path / "out")

    expected = {f"{name}.schema.json" for name in CATALOG} | {ENVELOPE_FILE, ASYNCAPI_FILE}
    assert {path.name for path in written} == expected
    assert {path.name for path in (tmp_path / "out").iterdir()} == expected


@pytest.mark.parametrize("name", ["envelope", *CATALOG])
def test_every_schema_is_valid_draft_2020_12_and_resolves_standalone(
    exported: Path, name: str
) -> None:
    schema = _load(exported, name)

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == DRAFT_2020_12
    for ref in _refs(schema):
        _resolve(schema, ref)


@pytest.mark.parametrize("name", list(CATALOG))
def test_message_schema_fixes_type_and_version(exported: Path, name: str) -> None:
    properties = _load(exported, name)["properties"]

    assert properties["type"]["const"] == name
    assert properties["version"]["const"] == 1


def test_real_job_submit_envelope_validates(
    job_submit: jsonschema.Draft202012Validator,
) -> None:
    job_submit.validate(_job_submit_body())


def test_job_submit_with_a_wrongly_typed_field_is_invalid(
    job_submit: jsonschema.Draft202012Validator,
) -> None:
    errors = list(job_submit.iter_errors(_job_submit_body(walltime_s="x")))

    assert [list(error.absolute_path) for error in errors] == [["payload", "spec", "walltime_s"]]


def test_job_submit_schema_refuses_another_type_unknown_fields_and_no_payload(
    job_submit: jsonschema.Draft202012Validator,
) -> None:
    body = _job_submit_body()
    without_payload = {key: value for key, value in body.items() if key != "payload"}

    assert not job_submit.is_valid({**body, "type": "job.cancel"})
    assert not job_submit.is_valid({**body, "extra": "x"})
    assert not job_submit.is_valid(without_payload)


def test_envelope_schema_leaves_payload_open(exported: Path) -> None:
    validator = jsonschema.Draft202012Validator(_load(exported, "envelope"))

    validator.validate({"id": str(uuid.uuid4()), "type": "anything.new", "payload": {"w": 1}})
    assert not validator.is_valid({"payload": {}})
    # A sender chooses the id: a command without one could not be repeated safely.
    assert not validator.is_valid({"type": "job.submit", "payload": {}})


def test_asyncapi_names_every_catalog_type(asyncapi: dict[str, Any]) -> None:
    assert asyncapi["asyncapi"] == "2.6.0"
    assert set(asyncapi["components"]["messages"]) == set(CATALOG)
    used = {
        ref.removeprefix("#/components/messages/")
        for channel in asyncapi["channels"].values()
        for ref in _refs(channel)
        if ref.startswith("#/components/messages/")
    }
    assert used == set(CATALOG)


def test_asyncapi_channels_are_routing_keys_bound_to_their_exchange(
    asyncapi: dict[str, Any],
) -> None:
    channels = asyncapi["channels"]

    assert set(channels) == {entry.key_pattern for entry in CATALOG.values()} | {"medhive.dead"}
    assert "node.{node_id}.run" in channels
    assert set(channels["node.{node_id}.run"]["parameters"]) == {"node_id"}
    for entry in CATALOG.values():
        channel = channels[entry.key_pattern]
        binding = channel["bindings"]["amqp"]
        assert binding["is"] == "routingKey"
        assert binding["exchange"] == {
            "name": entry.exchange,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
        }
        operation = "publish" if entry.exchange == COMMANDS else "subscribe"
        assert entry.exchange in {COMMANDS, EVENTS, TENANTS}
        assert set(channel) & {"publish", "subscribe"} == {operation}
    assert channels["medhive.dead"]["bindings"]["amqp"]["is"] == "queue"


def test_asyncapi_marks_exactly_the_channels_an_integrator_may_use(
    asyncapi: dict[str, Any],
) -> None:
    """An integrator publishes two commands and reads its tenant's channel, nothing else."""
    channels = asyncapi["channels"]
    for_integrators = {
        name for name, channel in channels.items()
        if channel["x-medhive-audience"] == "integrators"
    }  # fmt: skip
    assert for_integrators == {"job.submit", "job.cancel"} | {
        entry.key_pattern for entry in CATALOG.values() if entry.exchange == TENANTS
    }
    assert "{tenant}.job.succeeded" in for_integrators
    assert "{tenant}.command.rejected" in for_integrators
    assert set(channels["{tenant}.job.queued"]["parameters"]) == {"tenant"}
    assert "^T\\." in channels["{tenant}.job.queued"]["description"]
    assert channels["run.output"]["x-medhive-audience"] == "services"
    assert channels["message.rejected"]["x-medhive-audience"] == "services"


def test_asyncapi_says_user_id_is_required_and_maps_to_a_tenant(
    asyncapi: dict[str, Any],
) -> None:
    description = asyncapi["info"]["description"]

    assert "`user_id`" in description
    assert "RabbitMQ validates it" in description
    assert "scheduler maps that user to a tenant" in description
    assert asyncapi["servers"]["rabbitmq"]["protocol"] == "amqp"


def test_asyncapi_references_all_resolve(asyncapi: dict[str, Any]) -> None:
    refs = _refs(asyncapi)

    assert refs
    for ref in refs:
        _resolve(asyncapi, ref)


def test_asyncapi_job_submit_payload_checks_bodies(asyncapi: dict[str, Any]) -> None:
    """The message payload in the AsyncAPI document accepts and refuses what the file does."""
    payload = asyncapi["components"]["messages"]["job.submit"]["payload"]
    # Its references point into `#/components/...`: validate with the document's
    # components at the root so they resolve as they do for AsyncAPI tooling.
    validator = jsonschema.Draft202012Validator({**payload, "components": asyncapi["components"]})

    validator.validate(_job_submit_body())
    assert not validator.is_valid(_job_submit_body(walltime_s="x"))
    assert not validator.is_valid({**_job_submit_body(), "type": "job.cancel"})
