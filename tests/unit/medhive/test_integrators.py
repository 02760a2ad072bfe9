"""The permissions an integrator gets, and that the README states the same ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medhive.integrators import integrator_permissions

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_states_exactly_the_permissions_an_integrator_gets() -> None:
    text = README.read_text().replace("\\|", "|")  # a pipe in a table cell is escaped
    rules = integrator_permissions("ris", "radiology")
    patterns = [rules.configure, rules.write, rules.read]
    patterns += [p for write, read in rules.topics.values() for p in (write, read)]
    for pattern in patterns:
        assert f"`{pattern}`" in text, pattern


def test_an_integrator_may_read_only_keys_of_its_own_tenant() -> None:
    read = re.compile(integrator_permissions("ris", "radiology").topics["medhive.tenants"][1])
    assert read.search("radiology.job.queued") and read.search("radiology.#")
    for key in ("#", "*.job.queued", "cardiology.job.queued", "radiology", "radiologyx.#"):
        assert not read.search(key), key


@pytest.mark.parametrize("tenant", ["a.b", "#", "*", "", "x" * 65, "-lead"])
def test_a_name_that_could_widen_a_pattern_is_refused(tenant: str) -> None:
    with pytest.raises(ValueError, match="tenant"):
        integrator_permissions("ris", tenant)
