"""Every free-form part of a job description is bounded, and the bound is named."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.messages.jobs import JobCancel, JobSpec

BASE = {"name": "x", "image": "i"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("labels", {f"k{i}": "v" for i in range(65)}),
        ("labels", {"k" * 129: "v"}),
        ("labels", {"k": "v" * 1025}),
        ("labels", {"a\x00b": "v"}),
        ("env", {f"K{i}": "v" for i in range(129)}),
        ("env", {"K=V": "v"}),
        ("env", {"K": "v" * 8193}),
        ("env", {"K": "a\x00b"}),
        ("command", ["x"] * 257),
        ("command", ["x" * 8193]),
        ("command", ["a\x00b"]),
        ("workdir", "relative/dir"),
        ("workdir", "/" + "d" * 1024),
        ("name", "n" * 129),
        ("idempotency_key", "k" * 257),
    ],
)
def test_a_job_past_a_bound_is_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate({**BASE, field: value})
    assert refused.value.errors()[0]["loc"][0] == field


def test_a_job_at_its_bounds_is_accepted() -> None:
    spec = JobSpec.model_validate(
        {
            **BASE,
            "labels": {f"k{i}": "v" * 1024 for i in range(64)},
            "env": {f"K{i}": "v" * 8192 for i in range(128)},
            "command": ["x" * 100] * 256,
            "workdir": "/",
        }
    )
    assert len(spec.command or []) == 256


def test_a_cancel_names_a_job_of_bounded_length() -> None:
    with pytest.raises(ValidationError):
        JobCancel(job_id="j" * 65)
