"""Every message type has exactly one handler in medhive, or is marked as nobody's.

The tables are found, not listed: every `services.<service>.handlers` module is
imported and each `HandlerTable` in it counted. A new type in the catalog without a
handler (or with two) fails here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from typing import Any

import pytest

import services
from shared.consume import Incoming
from shared.handlers import HandlerTable, on
from shared.messages.catalog import CATALOG
from shared.messages.jobs import JobCancel, JobSubmit


def handler_tables() -> dict[str, HandlerTable[Any]]:
    """Every handler table of every service, by `service.TABLE`."""
    tables: dict[str, HandlerTable[Any]] = {}
    for service in pkgutil.iter_modules(services.__path__):
        try:
            module = importlib.import_module(f"services.{service.name}.handlers")
        except ModuleNotFoundError:
            continue
        for name, value in vars(module).items():
            if isinstance(value, HandlerTable):
                tables[f"{service.name}.{name}"] = value
    return tables


def test_each_service_that_consumes_has_its_table() -> None:
    found = {name.split(".")[0] for name in handler_tables()}
    assert found == {"scheduler", "datacache", "vmnode", "netgw"}  # the audit keeps all


def test_every_consumed_type_has_exactly_one_handler_and_no_other_type_has_one() -> None:
    handled = Counter(t for table in handler_tables().values() for t in table.types)
    for name, entry in CATALOG.items():
        if entry.consumed:
            assert handled[name] == 1, f"{name} is handled by {handled[name]} tables, not 1"
        else:
            assert handled[name] == 0, f"{name} is marked consumed=False but has a handler"


def test_queues_are_named_in_the_topology_only() -> None:
    from shared import topology

    names = {v for k, v in vars(topology).items() if k.isupper() and isinstance(v, str)}
    for table_name, table in handler_tables().items():
        assert table.queue in names, f"{table_name}'s queue {table.queue!r} is not in topology"


def test_a_row_with_another_model_than_the_catalogs_is_refused() -> None:
    class Handlers:
        async def submit(self, msg: Incoming[JobSubmit]) -> None: ...

    with pytest.raises(TypeError, match=r"job\.cancel carries JobCancel"):
        on("job.cancel", JobSubmit, Handlers.submit)
    with pytest.raises(ValueError, match="not in the message catalog"):
        on("job.resubmit", JobSubmit, Handlers.submit)


def test_a_type_in_two_rows_of_one_table_is_refused() -> None:
    class Handlers:
        async def cancel(self, msg: Incoming[JobCancel]) -> None: ...

    row = on("job.cancel", JobCancel, Handlers.cancel)
    with pytest.raises(ValueError, match="more than one handler"):
        HandlerTable("test.queue", (row, row))


def test_bindings_come_from_the_catalog() -> None:
    tables = handler_tables()
    assert tables["vmnode.COMMANDS"].bindings("n1") == [
        ("medhive.commands", "node.n1.run"),
        ("medhive.commands", "node.n1.cancel"),
    ]
    assert tables["vmnode.COMMANDS"].queue_name("n1") == "node.n1"
    webhooks = tables["scheduler.WEBHOOK_EVENTS"]
    assert webhooks.bindings() == []  # bound per tenant with a webhook
    assert ("medhive.tenants", "radiology.job.succeeded") in webhooks.bindings(
        tenants=["radiology"]
    )
