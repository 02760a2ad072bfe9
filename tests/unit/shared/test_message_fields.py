"""Every field of every message payload is described: the descriptions are the published
JSON Schema and AsyncAPI documentation other hospital systems read."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

from pydantic import BaseModel

from shared.messages.catalog import CATALOG


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models a field's type names: itself, or inside list, dict, union..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in get_args(annotation):
        yield from _models_in(argument)


def _payload_models() -> list[type[BaseModel]]:
    """Every catalog payload model and every model nested in their fields, once each."""
    found: dict[type[BaseModel], None] = {}
    pending: list[type[BaseModel]] = [entry.model for entry in CATALOG.values()]
    while pending:
        model = pending.pop()
        if model in found:
            continue
        found[model] = None
        for field in model.model_fields.values():
            pending.extend(_models_in(field.annotation))
    return list(found)


def test_the_walk_reaches_nested_models() -> None:
    names = {model.__name__ for model in _payload_models()}

    assert {"JobSubmit", "JobSpec", "Resources", "VmSpec", "InteractivePort"} <= names
    assert {"InputSpec", "OutputSpec", "StagedFile", "StagedInput"} <= names


def test_every_payload_field_has_a_description() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for model in _payload_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]

    assert not missing, f"{len(missing)} payload fields without a description: " + ", ".join(
        sorted(missing)
    )
