"""Settings: one frozen dataclass built once from ``LABQ_*`` environment variables.

Every tunable of labq lives here, with its unit in its name. Services call
``Settings.from_env()`` once at start-up and pass the object down; tests build a
``Settings`` directly (``Settings(data_dir=tmp, prefix="t123")``). Nothing reads the
environment at import time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    #: AMQP URL of the RabbitMQ broker.
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/labq.db``.
    database_url: str = ""
    #: The shared volume: bundles, logs, results, environments.
    data_dir: Path = Path("data")
    #: Where a worker unpacks jobs; empty means ``<data_dir>/work``. Local disk is best.
    work_dir: Path | None = None
    #: Prefix of every queue and exchange name; tests use a unique one per run.
    prefix: str = "labq"
    #: Address and port of the backend (``labq up`` and ``labq backend``).
    host: str = "127.0.0.1"
    port: int = 8080
    #: How many workers ``labq up`` starts.
    workers: int = 2
    #: gunicorn threads per backend process; each open event/log stream holds one.
    backend_threads: int = 64
    #: Base URL of the server for the CLI.
    url: str = "http://127.0.0.1:8080"
    #: A name for this worker (shown on jobs); empty means ``<hostname>-<pid>``.
    worker_name: str = ""
    #: Logging level of every labq process (DEBUG, INFO, WARNING, ...).
    log_level: str = "INFO"

    # -- bundles --------------------------------------------------------------
    max_upload_bytes: int = 200 * MIB
    max_bundle_files: int = 10_000
    max_unpacked_bytes: int = 2048 * MIB
    #: Largest allowed uncompressed/compressed ratio of one member (zip bombs).
    max_compression_ratio: int = 200

    # -- limits (defaults and server-side maxima for labq.toml) ----------------
    default_timeout_s: int = 24 * 3600
    max_timeout_s: int = 7 * 24 * 3600
    default_memory_mb: int = 4096
    max_memory_mb: int = 16384
    #: 0 means "all CPUs of the worker's host".
    default_cpus: int = 0
    max_cpus: int = 0
    default_max_output_bytes: int = 1024 * MIB
    max_output_bytes: int = 10 * 1024 * MIB

    # -- worker behaviour -----------------------------------------------------
    #: A job whose worker vanished this many times ends ``failed``.
    max_attempts: int = 3
    #: SIGTERM → SIGKILL grace when a job is stopped.
    stop_grace_s: float = 10.0
    #: How long a worker given SIGTERM lets its current job finish before requeueing it.
    shutdown_grace_s: float = 30.0
    #: Seconds between status events while a job runs.
    status_interval_s: float = 1.0
    #: AMQP heartbeat; served by the connection thread while jobs run.
    heartbeat_s: int = 30

    # -- environments (uv) ----------------------------------------------------
    #: Interpreter job environments are built from; empty means the one running labq.
    job_python: str = ""
    #: Extra ``--find-links`` location for uv (a lab wheelhouse; tests use a local folder).
    uv_find_links: str = ""
    #: Pass ``--offline`` to uv (no index access at all).
    uv_offline: bool = False
    #: Size budget of the environment cache; least recently used ones go first.
    env_cache_max_bytes: int = 20 * 1024 * MIB
    #: How long a failed environment install may take before it is abandoned.
    env_build_timeout_s: int = 1800

    # -- backend --------------------------------------------------------------
    #: Jobs still ``created`` this long after upload are re-published by the outbox relay.
    outbox_interval_s: float = 2.0

    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(Path(self.data_dir) / 'labq.db').resolve()}"

    @property
    def resolved_work_dir(self) -> Path:
        return Path(self.work_dir) if self.work_dir else Path(self.data_dir) / "work"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def env_names(cls) -> set[str]:
        """Every ``LABQ_*`` variable labq reads (checked against docker-compose.yml)."""
        return {f"LABQ_{f.name.upper()}" for f in fields(cls) if f.name != "extra"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"LABQ_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.type, raw)
        values.update(overrides)
        return cls(**values)


def _convert(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("Path"):
            return Path(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(
            f"LABQ_{name.upper()}={raw!r} is not a valid {kind}; fix or unset it"
        ) from exc
