"""docker-compose.yml is consistent with the code (no Docker engine runs here).

Every service command is a real ``labq`` subcommand, every ``LABQ_*`` variable it sets is
one labq reads, the image installs the package, the data volume is shared at
``LABQ_DATA_DIR`` by the backend and the workers, and RabbitMQ is health-checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from labq.client.cli import main
from labq.shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _labq_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items()
            if "labq" in str(svc.get("image", "")) or "build" in svc}


def _command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    return cmd.split() if isinstance(cmd, str) else list(cmd or [])


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_services_are_the_ones_labq_needs(compose):
    services = compose["services"]
    assert {"rabbitmq", "postgres", "backend"} <= set(services)
    workers = [n for n, s in services.items() if _command(s)[1:2] == ["worker"]]
    assert len(workers) >= 2


def test_every_command_is_a_real_labq_subcommand(compose):
    labq = _labq_services(compose)
    assert labq
    for name, svc in labq.items():
        cmd = _command(svc)
        assert cmd[:1] == ["labq"], f"{name}: {cmd}"
        assert cmd[1] in main.commands, f"{name}: `labq {cmd[1]}` does not exist"


def test_every_labq_variable_is_one_labq_reads(compose):
    known = Settings.env_names() | {"LABQ_LOG_LEVEL"}
    for name, svc in _labq_services(compose).items():
        env = _env(svc)
        unknown = {k for k in env if k.startswith("LABQ_")} - known
        assert not unknown, f"{name} sets variables labq does not read: {unknown}"
        # And their values parse.
        Settings.from_env(env)


def test_backend_listens_on_all_interfaces_and_uses_postgres(compose):
    env = _env(compose["services"]["backend"])
    assert env["LABQ_HOST"] == "0.0.0.0"
    assert env["LABQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@rabbitmq:" in env["LABQ_RABBITMQ_URL"]
    assert "@postgres:" in env["LABQ_DATABASE_URL"]
    port = int(env.get("LABQ_PORT", Settings().port))
    assert any(str(p).endswith(f":{port}") for p in compose["services"]["backend"]["ports"])


def test_one_volume_shared_at_the_data_dir(compose):
    labq = _labq_services(compose)
    mounts = {}
    for name, svc in labq.items():
        data_dir = _env(svc)["LABQ_DATA_DIR"]
        vols = [str(v).split(":") for v in svc.get("volumes", [])]
        at_data = [v[0] for v in vols if len(v) >= 2 and v[1] == data_dir]
        assert at_data, f"{name} does not mount a volume at LABQ_DATA_DIR={data_dir}"
        mounts[name] = (at_data[0], data_dir)
    assert len(set(mounts.values())) == 1, mounts
    volume = next(iter(mounts.values()))[0]
    assert volume in (compose.get("volumes") or {})


def test_rabbitmq_is_health_checked_and_awaited(compose):
    services = compose["services"]
    assert services["rabbitmq"]["healthcheck"]["test"]
    assert services["postgres"]["healthcheck"]["test"]
    for name, svc in _labq_services(compose).items():
        deps = svc.get("depends_on") or {}
        assert deps.get("rabbitmq", {}).get("condition") == "service_healthy", name


def test_dockerfile_installs_the_package():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM python:3.11" in text
    assert "pip install" in text and "[postgres]" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored
