"""docker-compose.yml is consistent with the code (tests/compose/ runs it for real).

Every service command is a real ``labq`` subcommand, every ``LABQ_*`` variable it sets is
one labq reads, the image installs the package, the data volume is shared at
``LABQ_DATA_DIR`` by the backend and the workers, the broker and the database are
health-checked, passwords come only from the env file, and the CI override changes
nothing but where the images come from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from labq.client.cli import main
from labq.shared.settings import Settings
from labq.shared.topology import Topology

REPO = Path(__file__).resolve().parents[2]
REQUIRED_VAR = re.compile(r"\$\{(\w+):\?[^}]*\}")


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


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text))
    assert match and any(match.groups()), text
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_services_are_the_ones_labq_needs(compose):
    services = compose["services"]
    assert {"rabbitmq", "postgres", "backend", "worker"} <= set(services)
    # One worker service, scaled with `docker compose up --scale worker=N`.
    workers = [n for n, s in services.items() if _command(s)[1:2] == ["worker"]]
    assert workers == ["worker"]
    # Its containers name themselves after their hostname: no fixed worker name.
    assert "LABQ_WORKER_NAME" not in _env(services["worker"])


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
        settings = Settings.from_env(env)
        # Replicated queues, the same on one node and on a cluster.
        assert Topology.from_settings(settings).queue_type == "quorum", name


def test_backend_listens_on_all_interfaces_and_uses_postgres(compose):
    backend = compose["services"]["backend"]
    env = _env(backend)
    assert env["LABQ_HOST"] == "0.0.0.0"
    assert env["LABQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "@rabbitmq:" in env["LABQ_RABBITMQ_URL"]
    assert "@postgres:" in env["LABQ_DATABASE_URL"]
    port = int(env.get("LABQ_PORT", Settings().port))
    assert any(str(p).endswith(f":{port}") for p in backend["ports"])


def test_passwords_come_from_the_env_file_only(compose):
    services = compose["services"]
    broker_url = _env(services["backend"])["LABQ_RABBITMQ_URL"]
    db_url = _env(services["backend"])["LABQ_DATABASE_URL"]
    assert "${RABBITMQ_PASSWORD:?" in broker_url and "guest" not in broker_url
    assert "${POSTGRES_PASSWORD:?" in db_url
    assert _env(services["rabbitmq"])["RABBITMQ_DEFAULT_PASS"].startswith(
        "${RABBITMQ_PASSWORD:?")
    assert _env(services["postgres"])["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    # Workers never talk to the database: they do not get its password.
    assert "LABQ_DATABASE_URL" not in _env(services["worker"])


def test_the_env_example_sets_every_required_variable():
    required = set(REQUIRED_VAR.findall((REPO / "docker-compose.yml").read_text()))
    assert {"RABBITMQ_PASSWORD", "POSTGRES_PASSWORD"} <= required
    example = (REPO / "compose.env.example").read_text()
    defined = {line.split("=", 1)[0] for line in example.splitlines()
               if "=" in line and not line.startswith("#")}
    assert required <= defined, required - defined
    # The env file holds secrets: never in the image, never in git.
    assert ".env" in (REPO / ".dockerignore").read_text().split()
    assert "/.env" in (REPO / ".gitignore").read_text().split()


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


def test_the_broker_and_database_are_health_checked_and_awaited(compose):
    services = compose["services"]
    assert services["rabbitmq"]["healthcheck"]["test"]
    assert services["postgres"]["healthcheck"]["test"]
    # The node keeps its data under rabbit@<hostname>: the hostname must not change.
    assert services["rabbitmq"]["hostname"] == "rabbitmq"
    for name, svc in _labq_services(compose).items():
        deps = svc.get("depends_on") or {}
        assert deps.get("rabbitmq", {}).get("condition") == "service_healthy", name
    assert services["backend"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_every_service_restarts_and_stops_gracefully(compose):
    for name, svc in compose["services"].items():
        assert svc.get("restart") == "unless-stopped", name
    worker = compose["services"]["worker"]
    defaults = Settings()
    assert _seconds(worker["stop_grace_period"]) > defaults.shutdown_grace_s + \
        defaults.stop_grace_s


def test_the_worker_can_build_the_whole_sandbox(compose):
    worker = compose["services"]["worker"]
    env = _env(worker)
    assert env["LABQ_SANDBOX"] == "required"
    # Root in its container (jobs get uids of their own), privileged (bwrap's /proc, a
    # writable cgroup, /dev/net/tun) and a cgroup namespace of its own (v1 hosts).
    assert worker["user"] == "0:0" and worker["privileged"] is True
    assert worker["cgroup"] == "private"
    # Workspaces and environments on the worker host's own disk, not the shared volume.
    work = env["LABQ_WORK_DIR"]
    assert work != env["LABQ_DATA_DIR"] and not work.startswith(env["LABQ_DATA_DIR"] + "/")
    assert any(str(v).endswith(f":{work}") for v in worker["volumes"])
    # uid leases shared with the host's other workers.
    assert "/run/labq:/run/labq" in worker["volumes"]


def test_dockerfile_installs_the_package_on_a_chosen_base():
    text = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "FROM ${BASE_IMAGE}" in text
    installs = re.findall(r"pip install ([^\n]*)", text)
    assert "ARG LABQ_EXTRAS=postgres,s3" in text
    assert any("[$LABQ_EXTRAS]" in line and "-e" not in line.split() for line in installs), \
        installs
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "data" in ignored


def test_the_ci_override_only_says_where_images_come_from():
    override = yaml.safe_load((REPO / "tests" / "compose" / "compose.ci.yml").read_text())
    for name, svc in override["services"].items():
        assert set(svc) <= {"image", "pull_policy", "build"}, name
        assert svc["pull_policy"] == "never"
        assert set(svc.get("build", {})) <= {"args", "secrets", "labels"}, name
