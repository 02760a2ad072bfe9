"""Which Swarm nodes run jobs: the agent's placement constraints, read as Swarm reads
them, so that the capacity the agent offers is that of the nodes its jobs can go to.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_CONSTRAINT = re.compile(r"^\s*([\w.\-]+)\s*(==|!=)\s*(.+?)\s*$")


def _attribute(node: Mapping[str, Any], key: str) -> str | None:
    """A node's value for a constraint's key, as Swarm reads it (None: it has none)."""
    description = node.get("Description", {})
    spec = node.get("Spec", {})
    simple = {
        "node.id": node.get("ID"),
        "node.hostname": description.get("Hostname"),
        "node.role": spec.get("Role"),
        "node.platform.os": description.get("Platform", {}).get("OS"),
        "node.platform.arch": description.get("Platform", {}).get("Architecture"),
    }
    if key in simple:
        value = simple[key]
        return None if value is None else str(value)
    for prefix, found in (
        ("node.labels.", spec.get("Labels") or {}),
        ("engine.labels.", description.get("Engine", {}).get("Labels") or {}),
    ):
        if key.startswith(prefix):
            value = found.get(key.removeprefix(prefix))
            return None if value is None else str(value)
    raise ValueError(f"unsupported Swarm constraint key {key!r}")


def check_constraints(constraints: Sequence[str]) -> None:
    """Refuse (ValueError) a constraint this module cannot read, before any job needs it."""
    for constraint in constraints:
        match = _CONSTRAINT.match(constraint)
        if match is None:
            raise ValueError(f"not a Swarm constraint: {constraint!r}")
        _attribute({}, match.group(1))


def runs_jobs(node: Mapping[str, Any], constraints: Sequence[str]) -> bool:
    """Whether Swarm may place a job on `node` (ready, active, every constraint met;
    the keys and operators of Swarm's placement constraints, compared as Swarm does,
    case-insensitively)."""
    if node.get("Status", {}).get("State") != "ready":
        return False
    if node.get("Spec", {}).get("Availability") != "active":
        return False
    for constraint in constraints:
        match = _CONSTRAINT.match(constraint)
        if match is None:
            raise ValueError(f"not a Swarm constraint: {constraint!r}")
        key, operator, wanted = match.groups()
        value = _attribute(node, key)
        equal = value is not None and value.lower() == wanted.lower()
        if equal != (operator == "=="):
            return False
    return True
