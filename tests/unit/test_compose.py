"""docker-compose.yml as Compose itself reads it: valid, every service there, and each
medhive service wired to its own module, port and health check.

`docker-compose` (Debian 12's 1.29) is installed by scripts/setup.sh; Compose v2
(`docker compose`) is used instead where it is the one present.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: medhive's own services, each `python -m services.<name>` from the one image.
MEDHIVE_SERVICES = {"scheduler", "audit", "datacache", "vmnode", "netgw"}
EVERY_SERVICE = MEDHIVE_SERVICES | {"rabbitmq", "mongo"}


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.fail("neither docker-compose nor docker compose is installed (scripts/setup.sh)")


def compose(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Compose on `path`, from the project root, every profile enabled (netgw is in
    `gateway`)."""
    return subprocess.run(
        [*compose_command(), "-f", str(path), "--profile", "gateway", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as Compose resolves it (anchors merged, variables interpolated)."""
    done = compose(COMPOSE_FILE, "config")
    assert done.returncode == 0, done.stderr
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def test_compose_accepts_the_file() -> None:
    done = compose(COMPOSE_FILE, "config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_lists_every_service() -> None:
    done = compose(COMPOSE_FILE, "config", "--services")
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == EVERY_SERVICE


def test_each_medhive_service_runs_its_module_from_the_one_image(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in MEDHIVE_SERVICES:
        command = services[name]["command"]
        argv = shlex.split(command) if isinstance(command, str) else command
        assert argv == [f"services.{name}"], name
        assert services[name]["image"] == "medhive:latest", name


def test_each_health_check_asks_the_port_its_service_listens_on(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in MEDHIVE_SERVICES - {"netgw"}:  # netgw has no health check in the file
        port = services[name]["environment"][f"MEDHIVE_{name.upper()}_PORT"]
        probe = " ".join(services[name]["healthcheck"]["test"])
        assert re.search(rf"http://127\.0\.0\.1:{port}/healthz", probe), (name, probe)


def test_the_check_fails_on_a_broken_compose_file(tmp_path: Path) -> None:
    """An unknown key in a service is refused, so the checks above would notice one."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "\n  scheduler:\n" in text
    broken.write_text(text.replace("\n  scheduler:\n", "\n  scheduler:\n    replicaz: 2\n", 1))
    done = compose(broken, "config", "-q")
    assert done.returncode != 0
    assert "replicaz" in done.stderr
