"""Which configured source serves a URI for a tenant: the allow-list of the datacache."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.datacache.sources.base import SourceRefused
from services.datacache.sources.registry import SOURCE_CLASSES, SourceDirectory


def _directory(tmp_path: Path) -> SourceDirectory:
    config = tmp_path / "sources.yaml"
    config.write_text(
        """
sources:
  - {tenant: radiology, match: "https://pacs.example", token: "r-secret"}
  - {tenant: radiology, match: "https://pacs.example/research", token: "research-secret"}
  - {tenant: cardiology, match: "https://pacs.example", username: c, password: "c-secret"}
  - {tenant: radiology, match: "xnat://xnat.example", username: u, password: p}
"""
    )
    return SourceDirectory.from_file(config)


def test_the_longest_match_of_the_tenant_wins(tmp_path: Path) -> None:
    directory = _directory(tmp_path)
    plain = directory.config_for("radiology", "https://pacs.example/studies/1")
    research = directory.config_for("radiology", "https://pacs.example/research/x")
    assert plain.token is not None and plain.token.get_secret_value() == "r-secret"
    assert research.token is not None and research.token.get_secret_value() == "research-secret"
    other = directory.config_for("cardiology", "https://pacs.example/research/x")
    assert other.username == "c"


@pytest.mark.parametrize(
    "tenant, uri",
    [
        ("radiology", "https://pacs.example.evil.org/a"),  # a host that only starts alike
        ("radiology", "http://pacs.example/a"),  # another scheme
        ("radiology", "https://pacs.example:8443/a"),  # another port
        ("oncology", "https://pacs.example/a"),  # a tenant with no sources
        ("cardiology", "xnat://xnat.example/projects/P"),  # another tenant's source
    ],
)
def test_what_is_not_configured_for_the_tenant_is_refused(
    tmp_path: Path, tenant: str, uri: str
) -> None:
    with pytest.raises(SourceRefused, match="no source configured"):
        _directory(tmp_path).config_for(tenant, uri)


def test_unknown_schemes_are_refused_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SourceRefused, match=r"ftp.*known: .*dimse"):
        _directory(tmp_path).open("radiology", "ftp://pacs.example/a", None)  # type: ignore[arg-type]


def test_every_scheme_of_the_job_description_has_a_source() -> None:
    assert {"http", "https", "xnat", "dicomweb+http", "dicomweb+https", "dimse"} <= set(
        SOURCE_CLASSES
    )


def test_secrets_never_show_in_a_config_repr(tmp_path: Path) -> None:
    text = repr(_directory(tmp_path))
    assert "secret" not in text.replace("SecretStr", "")
