"""Job descriptions with inputs and outputs, as the gateway validates them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.messages.data import InputSpec
from shared.messages.jobs import JobSpec


@pytest.mark.parametrize("path", ["/data", "/data/ct", "/mnt/in/series-2", "/data/"])
def test_input_paths_that_are_fine(path: str) -> None:
    assert InputSpec(name="ct", source="https://x/a", path=path).path == path.rstrip("/")


@pytest.mark.parametrize(
    "path", ["data", "/", "/tmp", "/tmp/x", "/outputs", "/outputs/a", "/proc/x", "/etc",
             "/a/../b", "/a//b"],
)  # fmt: skip
def test_input_paths_that_are_refused(path: str) -> None:
    with pytest.raises(ValidationError):
        InputSpec(name="ct", source="https://x/a", path=path)


def test_inputs_need_distinct_names_and_separate_paths() -> None:
    def spec(*inputs: tuple[str, str]) -> JobSpec:
        return JobSpec.model_validate({
            "name": "j", "image": "i",
            "inputs": [{"name": n, "source": "https://x/a", "path": p} for n, p in inputs],
        })  # fmt: skip

    assert spec(("a", "/data/a"), ("b", "/data/b")).needs_data
    with pytest.raises(ValidationError, match="unique"):
        spec(("a", "/data/a"), ("a", "/data/b"))
    with pytest.raises(ValidationError, match="overlap"):
        spec(("a", "/data"), ("b", "/data/b"))
    assert not JobSpec(name="j", image="i").needs_data
    assert JobSpec.model_validate({"name": "j", "image": "i", "outputs": {}}).needs_data
