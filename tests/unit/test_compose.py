"""docker-compose.yml as Compose itself reads it: valid, every service there, and each
medhive service wired to its own module, port and health check; the `monitoring`
profile's Prometheus scraping each of them, and its Grafana dashboard asking only for
metrics the services export.

`docker-compose` (Debian 12's 1.29) is installed by scripts/setup.sh; Compose v2
(`docker compose`) is used instead where it is the one present.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.netgw.settings import NetgwSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: medhive's own services, each `python -m services.<name>` from the one image.
MEDHIVE_SERVICES = {"scheduler", "audit", "datacache", "vmnode", "netgw"}
MONITORING = {"prometheus", "grafana"}
EVERY_SERVICE = MEDHIVE_SERVICES | MONITORING | {"rabbitmq", "rabbitmq-2", "rabbitmq-3", "mongo"}
#: Where a metric's name may be written: the modules that make metrics.
METRIC_NAME = re.compile(r'"(medhive_[a-z0-9_]+)"')
#: The series a histogram or counter family exports besides its name.
SERIES_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


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
    `gateway`, Prometheus and Grafana in `monitoring`)."""
    profiles = ["--profile", "gateway", "--profile", "monitoring", "--profile", "ha"]
    return subprocess.run(
        [*compose_command(), "-f", str(path), *profiles, *args],
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


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes, target -> source (Compose 1 writes `source:target:mode`,
    Compose 2 a mapping)."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def exported_metrics() -> set[str]:
    """Every metric name the services' code makes (a module that makes metrics imports
    prometheus_client, and writes each name whole)."""
    names = set()
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        text = path.read_text()
        if "prometheus_client" in text:
            names |= set(METRIC_NAME.findall(text))
    return names


def test_monitoring_runs_only_in_its_profile_on_files_that_exist(config: dict[str, Any]) -> None:
    for name in MONITORING:
        service = config["services"][name]
        assert service["profiles"] == ["monitoring"], name
        for target, source in mounts(service).items():
            if source.startswith("/"):  # a file of the project, not a named volume
                assert Path(source).exists(), (name, target, source)
    assert config["secrets"]["medhive_metrics_token"]["file"].endswith("secrets/metrics.token")


def test_prometheus_scrapes_each_service_at_its_port_with_the_metrics_token(
    config: dict[str, Any],
) -> None:
    prometheus = config["services"]["prometheus"]
    scrape = yaml.safe_load(Path(mounts(prometheus)["/etc/prometheus/prometheus.yml"]).read_text())
    secret = prometheus["secrets"][0]
    secret_name = secret if isinstance(secret, str) else secret["source"]
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == MEDHIVE_SERVICES
    for name, job in jobs.items():
        env = config["services"][name]["environment"]
        port = env.get(f"MEDHIVE_{name.upper()}_PORT", NetgwSettings().port)  # netgw: default
        assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"], name
        assert job["authorization"]["credentials_file"] == f"/run/secrets/{secret_name}"


def test_the_dashboard_asks_only_for_metrics_the_services_export(config: dict[str, Any]) -> None:
    grafana = mounts(config["services"]["grafana"])
    dashboards = Path(grafana["/etc/grafana/dashboards/medhive"])
    provisioning = Path(grafana["/etc/grafana/provisioning"])
    provider = yaml.safe_load((provisioning / "dashboards" / "medhive.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards/medhive"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]

    dashboard = json.loads((dashboards / "medhive.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert targets, "the dashboard shows nothing"
    exported = exported_metrics()
    asked = {name for t in targets for name in re.findall(r"medhive_[a-z0-9_]+", t["expr"])}
    unknown = {
        name
        for name in asked
        if name not in exported
        and not any(name.endswith(s) and name.removesuffix(s) in exported for s in SERIES_SUFFIXES)
    }
    assert unknown == set(), f"the dashboard asks for metrics no service exports: {unknown}"
    assert {t["datasource"]["uid"] for t in targets} == {uid}
