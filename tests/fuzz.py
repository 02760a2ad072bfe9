"""Schemathesis over an API's own OpenAPI document, against the running service.

Every operation, as every kind of caller, with cases generated from the document,
each answer checked by all of schemathesis's checks: no 5xx, only documented statuses
and content types, bodies that match the document, schema-valid requests accepted and
invalid ones refused. One check is narrowed: JSON Schema cannot state every rule of a
job (a cmdline needs a kernel, input names are distinct, input paths do not nest), so
a schema-valid request may be refused with a 422 when each problem it names is such a
rule (a pydantic `value_error`, raised by a validator); refused for anything the
document does state (a type, a bound, a pattern), it fails.
The calls are synchronous (requests), so they run in a thread while the service
answers on the test's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import checks

#: Examples per operation and caller: enough to find what the first fuzzing pass found
#: (F1-F13 of the HTTP issue), few enough for the suite's budget.
EXAMPLES = 20


def _rules_beyond_the_schema(response: Any) -> bool:
    """A 422 whose every problem is a rule a validator states, not the document."""
    if response.status_code != 422:
        return False
    problems = response.json()["error"].get("problems") or []
    return bool(problems) and all(p["problem"].startswith("Value error, ") for p in problems)


def positive_data_acceptance(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """schemathesis's own check, but for refusals by rules beyond the schema."""
    try:
        return checks.positive_data_acceptance(ctx, response, case)
    except Exception:
        if _rules_beyond_the_schema(response):
            return None
        raise


#: How each answer is checked: all of schemathesis's checks, one of them narrowed.
CHECKS: dict[str, Any] = {
    "excluded_checks": [checks.positive_data_acceptance],
    "additional_checks": [positive_data_acceptance],
}


def _fuzz(base_url: str, document: dict[str, Any], callers: dict[str, dict[str, str]],
          examples: int) -> list[str]:  # fmt: skip
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for who, headers in callers.items():
            try:
                _run(operation, base_url, headers, examples)
            except Exception as exc:  # a failed check: keep going, report them all
                failures.append(f"{operation.label} as {who}: {str(exc)[:2000]}")
    return failures


def _run(operation: Any, base_url: str, headers: dict[str, str], examples: int) -> None:
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy())
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=base_url, headers=headers, **CHECKS)

    run()


def _stateful(
    document: dict[str, Any], base_url: str, headers: dict[str, str], examples: int
) -> None:
    """Sequences along the document's links: submit a job, then read, follow, cancel it."""
    machine = schemathesis.openapi.from_dict(document).as_state_machine()

    class Sequences(machine):  # type: ignore[valid-type,misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": base_url, "headers": headers}

        def validate_response(  # type: ignore[override]
            self, response: Any, case: schemathesis.Case, **kwargs: Any
        ) -> None:
            case.validate_response(response, **CHECKS)

    Sequences.run(
        settings=hypothesis.settings(
            max_examples=examples,
            stateful_step_count=6,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )


async def fuzz_sequences(
    base_url: str, document: dict[str, Any], headers: dict[str, str], examples: int = EXAMPLES
) -> None:
    """Schemathesis's stateful phase along the links; raises what it finds."""
    await asyncio.to_thread(_stateful, document, base_url, headers, examples)


async def fuzz(
    base_url: str,
    document: dict[str, Any],
    callers: dict[str, dict[str, str]],
    examples: int = EXAMPLES,
) -> list[str]:
    """The failures schemathesis finds (empty when every check passes)."""
    return await asyncio.to_thread(_fuzz, base_url, document, callers, examples)
