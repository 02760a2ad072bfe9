"""Handler tables: the one place a service says what it consumes.

Each service's `handlers.py` holds a table per queue: which message types the queue
takes and which method handles each. The queue's name comes from `shared.topology`,
its bindings from the catalog (each type's exchange and routing key), so a type is
named once, in its table row, and nowhere else in the service:

    COMMANDS = HandlerTable(topology.SCHEDULER_COMMANDS, (
        on("job.submit", JobSubmit, CommandHandlers.submit),
        on("job.cancel", JobCancel, CommandHandlers.cancel),
    ))

A row names the payload model as well as the method. mypy checks that the method takes
an `Incoming` of that model, and `on` checks, when the module is imported, that the
model is the catalog's for the type: a handler can only be given the payload it reads.
`Bus.consume(table, handlers)` binds the methods to the service's handler object.

`tests/unit/shared/test_handler_tables.py` finds every table in `services` and checks
that each type of the catalog is consumed by exactly one of them, or is marked in the
catalog as consumed by no medhive service.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.consume import Handler, Incoming
from shared.messages.base import Payload
from shared.messages.catalog import CATALOG

#: The class whose methods a table's rows name (a service's handler object).
H = TypeVar("H")
P = TypeVar("P", bound=Payload)


@dataclass(frozen=True)
class Route(Generic[H]):
    """One row: a message type and the method of `H` that handles it."""

    type: str
    method: Callable[[H, Incoming[Any]], Awaitable[None]]


def on(type_: str, model: type[P], method: Callable[[H, Incoming[P]], Awaitable[None]]) -> Route[H]:
    """A row of a handler table; `model` must be the catalog's payload model of `type_`."""
    entry = CATALOG.get(type_)
    if entry is None:
        raise ValueError(f"{type_!r} is not in the message catalog")
    if entry.model is not model:
        raise TypeError(f"{type_} carries {entry.model.__name__}, not {model.__name__}")
    return Route(type_, method)


@dataclass(frozen=True)
class HandlerTable(Generic[H]):
    """The types one queue takes and their handlers.

    `queue` is the queue's name from `shared.topology`; a node's queue has `{node_id}`
    in it, filled in by `queue_name`.
    """

    queue: str
    routes: tuple[Route[H], ...]

    def __post_init__(self) -> None:
        seen = [route.type for route in self.routes]
        if doubled := {t for t in seen if seen.count(t) > 1}:
            raise ValueError(f"{self.queue}: more than one handler for {sorted(doubled)}")

    @property
    def types(self) -> frozenset[str]:
        return frozenset(route.type for route in self.routes)

    def queue_name(self, node_id: str | None = None) -> str:
        return self.queue.format(node_id=node_id)

    def bindings(
        self, node_id: str | None = None, tenants: Iterable[str] = ()
    ) -> list[tuple[str, str]]:
        """(exchange, routing key) of every type, from the catalog. A type on the
        tenants' exchange is bound once per tenant in `tenants` (none by default)."""
        keys: list[tuple[str, str]] = []
        for route in self.routes:
            entry = CATALOG[route.type]
            if entry.for_tenants:
                keys += [(entry.exchange, entry.key_pattern.format(tenant=t)) for t in tenants]
            else:
                keys.append((entry.exchange, entry.key_pattern.format(node_id=node_id)))
        return keys

    def bind(self, target: H) -> dict[str, Handler]:
        """The handlers of this table, as methods of `target`."""
        return {route.type: functools.partial(route.method, target) for route in self.routes}
