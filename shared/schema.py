"""Export the message catalog as JSON Schema files and one AsyncAPI 2.6 document.

Other hospital systems publish `job.submit` and read medhive's events from their own
code, in their own languages (README, "Other hospital systems on the bus"). They cannot
import `shared.messages`, so the catalog is published in the two formats their tooling
reads:

- `<type>.schema.json`: one self-contained JSON Schema (Draft 2020-12) per message
  type, describing the whole AMQP body, i.e. the envelope with that type's payload.
  A sender can validate a message before publishing it, without resolving anything.
- `envelope.schema.json`: the envelope alone, payload left open.
- `asyncapi.yaml`: exchanges, routing keys, who publishes what, and the rule that
  the AMQP `user_id` property must be set, which no JSON Schema can express.

Everything is generated from the pydantic models and `CATALOG`, so the published
contract cannot drift from what the consumers validate.

One module because the per-type JSON Schema files and the AsyncAPI document are two
renderings of the same catalog entries and must narrow the envelope to a type the same
way (`type` and `version` as constants, `_payload_required`), so that a sender's tooling
gets one verdict from either.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.envelope import Envelope
from shared.messages.catalog import (
    CATALOG,
    COMMANDS,
    DEAD,
    INTEGRATOR_COMMANDS,
    TENANTS,
    MessageType,
)
from shared.topology import DEAD_LETTER_BOUNDS, DEAD_LETTER_QUEUE

JsonSchema = dict[str, Any]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_VERSION = "2.6.0"
#: AMQP binding objects of AsyncAPI 2.x (channel, operation, message).
AMQP_BINDING_VERSION = "0.2.0"
#: Every catalog type is at version 1. A breaking change adds a version to the catalog
#: entry (ARCHITECTURE.md: within a version only optional fields may be added).
PAYLOAD_VERSION = 1
ENVELOPE_FILE = "envelope.schema.json"
ASYNCAPI_FILE = "asyncapi.yaml"

_PARAMETER = re.compile(r"\{(\w+)\}")

_DESCRIPTION = f"""\
Commands and events of medhive on RabbitMQ (AMQP 0-9-1).

Every message body is one JSON envelope (`components.schemas.Envelope`) whose `type`
names the catalog entry and whose `payload` follows that entry's schema. The same
schemas are published as standalone JSON Schema files, one per type.

**Two kinds of parties.** medhive's services and operators use every channel. Another
hospital system (an integrator) gets an AMQP user for one tenant from
`medhive amqp-user add NAME --tenant TENANT`, and RabbitMQ's own permissions let it
use exactly the channels marked `x-medhive-audience: integrators`: publish
{", ".join(f"`{name}`" for name in INTEGRATOR_COMMANDS)} to `{COMMANDS}`, and read its
tenant's keys (`<tenant>.#`) of `{TENANTS}`, from its own queue
`medhive.integrator.<user>` or from server-named queues (`amq.gen-*`) it binds itself.
Binding any other key, or to any other exchange, is refused by the broker.

**Who sent it.** Set the AMQP `user_id` property of every message you publish to the
user name of your AMQP connection. RabbitMQ validates it: the broker refuses a message
whose `user_id` differs from the connection's user, so the property proves the sender.
The scheduler maps that user to a tenant and rejects a command without it or from an
unmapped user; the envelope's `tenant` and `actor` come from that mapping, never from
the body. `node.{{node_id}}.*` commands are internal: a node agent obeys only the AMQP
users it trusts (the scheduler's service account).

**Once per id.** The envelope `id` is required and chosen by the sender: a command is
acted on once per sender and id, so a repeat (after a lost confirm, say) is safe; a
repeated `job.submit` is answered with `job.duplicate`, which names the job. Events
may be delivered more than once (at least once); a repeat has the same `id`.

**Other AMQP properties.** `message_id` = envelope `id`, `type` = envelope `type`,
`content_type` = `application/json`, `delivery_mode` = 2 (persistent); publish with
publisher confirms. A body over 1 MiB (`MEDHIVE_AMQP_MAX_MESSAGE_BYTES`) is refused.

**Invalid messages** (undecodable, too large, failing validation, unknown type,
unauthorised sender) are dead-lettered to the `{DEAD}` exchange and announced by a
`message.rejected` event that says why (operators only: it quotes the body); the
sender's tenant is told by `command.rejected` on its channel (no body). Nothing is
dropped silently.
"""


def export_schemas(directory: Path) -> list[Path]:
    """Write the envelope schema, one schema per catalog type and `asyncapi.yaml`.

    Returns the files written, envelope first and the AsyncAPI document last.
    Existing files of the same names are overwritten; others are left alone.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = [_write_json(directory / ENVELOPE_FILE, envelope_schema())]
    for entry in CATALOG.values():
        written.append(_write_json(directory / f"{entry.name}.schema.json", message_schema(entry)))
    asyncapi = directory / ASYNCAPI_FILE
    asyncapi.write_text(
        yaml.dump(asyncapi_document(), Dumper=_Dumper, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    written.append(asyncapi)
    return written


def envelope_schema() -> JsonSchema:
    """The envelope with an open payload: what every consumer decodes first."""
    schema = Envelope.model_json_schema()
    return {"$schema": DIALECT, "$id": "urn:medhive:schema:envelope", **schema}


def message_schema(entry: MessageType) -> JsonSchema:
    """The whole body of one message type, valid standalone.

    Validation mode, because the schema states what a consumer accepts (defaults
    may be left out). The payload model's `$defs` are hoisted to the root, because a
    `$ref` such as `#/$defs/JobSpec` resolves against the document root, not against
    the subschema it was generated in.
    """
    schema = envelope_schema()
    payload = entry.model.model_json_schema()
    defs = _merge_defs(schema.pop("$defs", {}), payload.pop("$defs", {}))
    if set(payload) == {"$ref"}:
        # A recursive model comes out as a bare reference into its own `$defs`.
        payload_ref: JsonSchema = dict(payload)
    else:
        name = entry.model.__name__
        defs = _merge_defs(defs, {name: payload})
        payload_ref = {"$ref": f"#/$defs/{name}"}

    properties = schema["properties"]
    properties["type"] = {**properties["type"], "const": entry.name}
    properties["version"] = {**properties["version"], "const": PAYLOAD_VERSION}
    properties["payload"] = {**payload_ref, "description": entry.summary}
    schema["required"] = [*schema.get("required", []), *_payload_required(entry)]
    schema["$id"] = f"urn:medhive:schema:{entry.name}"
    schema["title"] = entry.name
    schema["description"] = (
        f"{entry.summary} Exchange `{entry.exchange}`, routing key `{entry.key_pattern}`."
    )
    if defs:
        schema["$defs"] = defs
    return schema


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 2.6 document of the whole catalog, from a client's point of view.

    In AsyncAPI 2.x, `publish` is what a client may send to the channel (commands)
    and `subscribe` what it may receive (events).
    """
    components_schemas, payload_refs = _component_schemas()
    envelope_ref = {"$ref": "#/components/schemas/Envelope"}
    messages = {
        entry.name: _message(entry, envelope_ref, payload_refs[entry.model])
        for entry in CATALOG.values()
    }
    channels: dict[str, Any] = {}
    for pattern, entries in _by_key_pattern(CATALOG.values()).items():
        channels[pattern] = _channel(pattern, entries)
    channels[DEAD_LETTER_QUEUE] = _dead_letter_channel(envelope_ref)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:medhive:messaging",
        "info": {
            "title": "medhive messaging",
            "version": _package_version(),
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "url": "{host}:{port}",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "The RabbitMQ broker of a medhive installation.",
                "variables": {"host": {"default": "localhost"}, "port": {"default": "5672"}},
                "security": [{"amqpUser": []}],
            }
        },
        "channels": channels,
        "components": {
            "schemas": components_schemas,
            "messages": messages,
            "securitySchemes": {
                "amqpUser": {
                    "type": "userPassword",
                    "description": "An AMQP user of the broker. It must equal the `user_id` "
                    "property of each message; the scheduler maps it to a tenant.",
                }
            },
        },
    }


def _component_schemas() -> tuple[JsonSchema, dict[type[BaseModel], JsonSchema]]:
    """All payload models and the envelope in one namespace for `components.schemas`.

    Generated together so that a model used by several payloads (`JobSpec`) appears
    once, and pydantic resolves any clash of two models with the same name.
    """
    models: list[type[BaseModel]] = [
        Envelope,
        *dict.fromkeys(entry.model for entry in CATALOG.values()),
    ]
    refs, top = models_json_schema(
        [(model, "validation") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    return top.get("$defs", {}), {model: refs[(model, "validation")] for model in models}


def _message(entry: MessageType, envelope_ref: JsonSchema, payload_ref: JsonSchema) -> JsonSchema:
    """One `components.messages` entry: the envelope narrowed to this type."""
    narrowed: JsonSchema = {
        "type": "object",
        "properties": {
            "type": {"const": entry.name},
            "version": {"const": PAYLOAD_VERSION},
            "payload": payload_ref,
        },
        "required": ["type", *_payload_required(entry)],
    }
    return {
        "messageId": entry.name,
        "name": entry.name,
        "title": entry.name,
        "summary": entry.summary,
        "description": (entry.model.__doc__ or "").strip(),
        "contentType": "application/json",
        "correlationId": {
            "description": "The job id, where there is one.",
            "location": "$message.payload#/correlation_id",
        },
        "tags": [{"name": "command" if entry.exchange == COMMANDS else "event"}],
        "payload": {"allOf": [envelope_ref, narrowed]},
        "bindings": {"amqp": {"messageType": entry.name, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _channel(pattern: str, entries: list[MessageType]) -> JsonSchema:
    """A routing key pattern on its exchange, with the one operation clients may do."""
    exchanges = {entry.exchange for entry in entries}
    if len(exchanges) != 1:
        raise ValueError(f"routing key {pattern!r} is on several exchanges: {sorted(exchanges)}")
    exchange = exchanges.pop()
    refs = [{"$ref": f"#/components/messages/{entry.name}"} for entry in entries]
    message = refs[0] if len(refs) == 1 else {"oneOf": refs}
    command = exchange == COMMANDS
    operation: JsonSchema = {
        "operationId": ("send_" if command else "receive_") + re.sub(r"\W+", "_", pattern),
        "summary": " ".join(entry.summary for entry in entries),
        "bindings": {"amqp": {"deliveryMode": 2, "bindingVersion": AMQP_BINDING_VERSION}},
    }
    if command:
        operation["description"] = (
            "Publish to the exchange with this routing key, with the AMQP `user_id` "
            "property set to your connection's user."
        )
    operation["message"] = message
    audience, permission = _audience(exchange, entries)
    channel: JsonSchema = {
        "description": f"Routing key `{pattern}` on the `{exchange}` exchange. {permission}",
        "x-medhive-audience": audience,
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
        ("publish" if command else "subscribe"): operation,
    }
    parameters = _PARAMETER.findall(pattern)
    if parameters:
        channel["parameters"] = {
            name: {
                "description": f"The `{name}` the message is addressed to.",
                "schema": {"type": "string"},
            }
            for name in parameters
        }
    return channel


def _audience(exchange: str, entries: list[MessageType]) -> tuple[str, str]:
    """Who may use a channel, and the broker permission that says so."""
    if exchange == TENANTS:
        return "integrators", (
            "An integrator of tenant T may bind keys starting `T.` only "
            "(topic permission: read `^T\\.`); services and operators see every tenant's."
        )
    if exchange == COMMANDS and all(entry.name in INTEGRATOR_COMMANDS for entry in entries):
        return "integrators", (
            "Integrators may publish it (topic permission: write "
            f"`^({'|'.join(INTEGRATOR_COMMANDS)})$` on `{COMMANDS}`)."
        )
    return "services", "medhive's services and operators only: no integrator may use it."


def _dead_letter_channel(envelope_ref: JsonSchema) -> JsonSchema:
    """The dead-letter queue: what operators find there, and its bounds."""
    bounds = ", ".join(f"`{name}` {value}" for name, value in DEAD_LETTER_BOUNDS.items())
    return {
        "description": (
            f"The queue `{DEAD_LETTER_QUEUE}`, bound to every key of the `{DEAD}` exchange: "
            "messages a consumer refused (header `x-medhive-reason`, and `x-medhive-queue`, "
            "`x-medhive-exchange`) or that failed every delivery (RabbitMQ's `x-death`), "
            "with their original properties, `user_id` included. Bounded "
            f"({bounds}): past the bounds the oldest go, and every letter is in the audit "
            "trail already. Operators use it through `medhive dead list|show|replay|purge`."
        ),
        "x-medhive-audience": "operators",
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": DEAD_LETTER_QUEUE,
                    "durable": True,
                    "exclusive": False,
                    "autoDelete": False,
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
        "subscribe": {
            "operationId": "receive_dead_letters",
            "summary": "Refused messages, as they were sent.",
            "message": {
                "name": "dead-letter",
                "summary": "Any message, usually an envelope; the body as its sender sent it.",
                "payload": envelope_ref,
            },
        },
    }


def _by_key_pattern(entries: Iterable[MessageType]) -> dict[str, list[MessageType]]:
    grouped: dict[str, list[MessageType]] = {}
    for entry in entries:
        grouped.setdefault(entry.key_pattern, []).append(entry)
    return grouped


def _merge_defs(into: JsonSchema, extra: JsonSchema) -> JsonSchema:
    """Union of two `$defs`; the same name for two different schemas is a bug."""
    merged = copy.deepcopy(into)
    for name, schema in extra.items():
        if name in merged and merged[name] != schema:
            raise ValueError(f"two different schemas named {name!r} in one document")
        merged[name] = schema
    return merged


def _payload_required(entry: MessageType) -> list[str]:
    """`["payload"]` when the payload model has a required field.

    An envelope without `payload` carries `{}`, which is valid only for a model with
    nothing required; saying so keeps the envelope's default from misleading.
    """
    required = any(field.is_required() for field in entry.model.model_fields.values())
    return ["payload"] if required else []


class _Dumper(yaml.SafeDumper):
    """Plain YAML for other tools: no anchors, multi-line text as literal blocks.

    The document reuses dicts (the same `$ref` in many messages); PyYAML would turn
    them into `&id001` anchors and aliases, which some AsyncAPI tooling rejects.
    """

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def _write_json(path: Path, schema: JsonSchema) -> Path:
    path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _package_version() -> str:
    try:
        return importlib.metadata.version("medhive")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"
