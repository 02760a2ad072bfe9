"""The job files in examples/: each one a job the API takes as it is (the model it parses
with, and the published JSON Schema), and each names only sources that the
sources-file entry in its header comments allows and the datacache can read.

The helpers here (`load_example`, `sources_entries`) are the end-to-end tests' too.
"""

from __future__ import annotations

import json
import re
import textwrap
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]  # no stubs among the dev dependencies
import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from services.datacache.sources.base import SourceConfig
from services.datacache.sources.registry import SourceDirectory
from shared.envelope import Envelope
from shared.messages.catalog import CATALOG
from shared.messages.jobs import JobSpec
from shared.schema import message_schema

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: What a newcomer finds an example of, and in which file.
CAPABILITIES = {
    "container": "hello.yaml",
    "data from DICOMweb": "dicomweb.yaml",
    "data from DIMSE": "dimse.yaml",
    "data from XNAT": "xnat.yaml",
    "HTTP input": "http-input.yaml",
    "outputs to a destination": "outputs-destination.yaml",
    "VM with ISO data": "vm-iso.yaml",
    "VM with a disk": "vm-disk.yaml",
    "interactive VM": "vm-interactive.yaml",
    "retries": "retries.yaml",
    "priority": "priority.yaml",
}
#: The header line after which an example shows the sources-file entry it needs.
SOURCES_MARKER = "MEDHIVE_DATACACHE_SOURCES_FILE"
_SOURCE_CONFIGS = TypeAdapter(list[SourceConfig])
#: The exported JSON Schema of `job.submit`, what other systems validate against.
_SUBMIT_SCHEMA = message_schema(CATALOG["job.submit"])


def example_files() -> list[Path]:
    return sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("*.yml")])


def load_example(name: str | Path) -> dict[str, Any]:
    """An example as the CLI sends it: read as YAML, sent as JSON (a YAML-only value,
    such as a date, fails here as it would there)."""
    path = EXAMPLES / name
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    job: dict[str, Any] = json.loads(json.dumps(data))
    return job


def header(path: Path) -> list[str]:
    """The comment lines an example starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def sources_entries(name: str | Path) -> list[dict[str, Any]]:
    """The sources-file entries shown in an example's header (an indented YAML list after
    the line that names MEDHIVE_DATACACHE_SOURCES_FILE); [] when it shows none."""
    lines = header(EXAMPLES / name)
    marker = next((n for n, line in enumerate(lines) if SOURCES_MARKER in line), None)
    if marker is None:
        return []
    block: list[str] = []
    for line in lines[marker + 1 :]:
        if line.startswith("#   "):
            block.append(line[1:])
        elif block:
            break
    assert block, f"{name}: no entry after the line naming {SOURCES_MARKER}"
    entries = yaml.safe_load(textwrap.dedent("\n".join(block)))
    assert isinstance(entries, list), f"{name}: the sources-file entry is not a YAML list"
    return entries


def named_sources(job: dict[str, Any]) -> list[str]:
    """Every source URI a job names: its inputs' and its results' destination."""
    uris = [item["source"] for item in job.get("inputs", [])]
    destination = (job.get("outputs") or {}).get("destination")
    return uris + ([destination] if destination else [])


def check_job(job: dict[str, Any]) -> None:
    """Validate a job as `POST /v1/jobs` does (strict types) and against the published
    `job.submit` JSON Schema, as another system's sender would."""
    JobSpec.model_validate(job, strict=True)
    check_against_schema(job)


def check_against_schema(job: dict[str, Any]) -> None:
    """Validate a `job.submit` message carrying `job` against its exported JSON Schema."""
    body = Envelope(id=uuid.uuid4(), type="job.submit", payload={"spec": job})
    jsonschema.validate(
        json.loads(body.model_dump_json()), _SUBMIT_SCHEMA, cls=jsonschema.Draft202012Validator
    )


def test_every_capability_has_its_example() -> None:
    missing = {cap: name for cap, name in CAPABILITIES.items() if not (EXAMPLES / name).is_file()}
    assert not missing


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_an_example_is_a_job_the_api_and_the_published_schema_accept(path: Path) -> None:
    check_job(load_example(path.name))


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_an_example_starts_by_saying_what_it_shows(path: Path) -> None:
    lines = header(path)
    assert lines and re.match(r"# \w", lines[0]), f"{path.name} starts with no comment"


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
async def test_an_example_names_only_sources_its_documented_entry_allows(path: Path) -> None:
    """Each source URI is covered by the header's sources-file entry (the datacache
    refuses one no entry covers) and is one the datacache's source class can read."""
    job = load_example(path.name)
    uris = named_sources(job)
    entries = sources_entries(path.name)
    if not uris:
        assert entries == [], f"{path.name} shows a sources-file entry it does not need"
        return
    directory = SourceDirectory(tuple(_SOURCE_CONFIGS.validate_python(entries)))
    async with aiohttp.ClientSession() as session:
        for uri in uris:
            for tenant in {config.tenant for config in directory.configs}:
                source, ref = directory.open(tenant, uri, session)
                source.canonical(ref)  # SourceRefused for a URI the source cannot read


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"gpus": 1}, id="unknown field"),
        pytest.param({"resources": {"cpus": 1, "gpus": 1}}, id="unknown nested field"),
        pytest.param({"walltime_s": "60"}, id="number as a string"),
        pytest.param({"retries": True}, id="boolean for a number"),
        pytest.param({"env": {"THREADS": 2}}, id="number for a string"),
    ],
)
def test_the_check_refuses_an_unknown_field_and_a_wrong_type(change: dict[str, Any]) -> None:
    """Both halves of `check_job` refuse it, each on its own."""
    job = {**load_example("hello.yaml"), **change}
    with pytest.raises(ValidationError):
        JobSpec.model_validate(job, strict=True)
    with pytest.raises(jsonschema.ValidationError):
        check_against_schema(job)
