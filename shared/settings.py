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

from labq.shared.errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    #: AMQP URL of the RabbitMQ broker; several comma-separated URLs name the nodes of a
    #: cluster (each connection tries them in a shuffled order, so load spreads).
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    #: Type of labq's durable queues: ``classic`` (one node) or ``quorum`` (replicated
    #: over a cluster, survives a node's loss). Fixed once the queues exist.
    queue_type: str = "classic"
    #: SQLAlchemy URL; empty means SQLite at ``<data_dir>/labq.db``.
    database_url: str = ""
    #: The shared volume: bundles, logs, results, environments.
    data_dir: Path = Path("data")
    #: Where a worker unpacks jobs; empty means ``<data_dir>/work``. Local disk is best.
    work_dir: Path | None = None
    #: Where bundles and results live: ``volume`` (under data_dir) or ``s3`` (an
    #: S3-compatible bucket; logs and job records stay in data_dir, see docs/admin.md).
    storage: str = "volume"
    #: The bucket for ``storage = s3`` (it must exist). Credentials and region come from
    #: the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
    #: AWS_DEFAULT_REGION), as boto3 reads them.
    s3_bucket: str = ""
    #: An S3-compatible store's URL (MinIO, Ceph, ...); empty means AWS S3.
    s3_endpoint_url: str = ""
    #: Put before every key labq writes in the bucket (e.g. ``labq/``), to share a bucket.
    s3_prefix: str = ""
    #: Prefix of every queue and exchange name; tests use a unique one per run.
    prefix: str = "labq"
    #: Address and port of the backend (``labq up`` and ``labq backend``).
    host: str = "127.0.0.1"
    port: int = 8080
    #: How many workers ``labq up`` starts.
    workers: int = 2
    #: Size of the backend's pools for outgoing calls (e.g. S3 connections). Requests
    #: and streams are greenlets (gevent), not threads, and are not bounded by it.
    backend_threads: int = 64
    #: Processes of ``labq backend`` (gunicorn gevent workers); 0: one per CPU core, at
    #: most 4. Each serves requests and streams; one of them applies the workers' events.
    backend_processes: int = 0
    #: Most live streams (events, logs) one ``labq backend`` keeps open, all its processes
    #: together; one more gets 503 with Retry-After. Each process keeps 1,000 more
    #: connections for the API and the pages.
    max_streams: int = 2000
    #: Seconds a client has to send a request's line and headers (also how long an idle
    #: keep-alive connection is kept).
    header_timeout_s: float = 10.0
    #: Seconds a request body may stall without a byte, and the grace before
    #: ``body_min_bytes_per_s`` applies: slower uploads are cut off with 408.
    body_timeout_s: float = 30.0
    #: Slowest average upload rate accepted (bytes/s) once ``body_timeout_s`` has passed.
    body_min_bytes_per_s: int = 8192
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
    #: How often the reconciler checks that queued jobs still have a message.
    reconcile_interval_s: float = 15.0
    #: A job queued this long with an empty queue and no worker on it is published again.
    reconcile_after_s: float = 60.0
    #: Jobs still ``created`` this long after upload are re-published by the outbox relay.
    outbox_interval_s: float = 2.0
    #: Most jobs one ``[sweep]`` may make.
    max_group_size: int = 100
    #: Let webhooks (notify_url) reach loopback and private addresses (a lab-internal
    #: chat bridge, tests); off by default so a job cannot make the server probe its LAN.
    webhook_allow_private: bool = False

    # -- accounts and the web ---------------------------------------------------
    #: Signs session cookies; empty means one generated once into ``<data_dir>/secret-key``.
    secret_key: str = ""
    #: Host names the backend answers to (comma-separated; ``.example.org`` matches its
    #: subdomains, ``*`` any host). Empty: the bound address, localhost and 127.0.0.1.
    allowed_hosts: str = ""
    #: Behind a reverse proxy: trust one hop of X-Forwarded-For/-Proto/-Host.
    trust_proxy: bool = False
    #: Jobs one user may have queued or running at once (0: no limit); more wait, held.
    max_running_per_user: int = 0
    #: Unfinished jobs (held included) one user may have; more are refused with 429.
    max_queued_per_user: int = 0
    #: Wrong passwords per user and client address per minute before logins answer 429.
    login_failures_per_minute: int = 5

    # -- the job sandbox (process_unit/isolation.py) -------------------------------
    #: ``auto``: every layer this host allows, saying which; ``required``: refuse to start
    #: a worker without all of them; ``off``: jobs run as the worker (development only).
    sandbox: str = "auto"
    #: Numeric uids jobs run as, ``FIRST-LAST``: one per running job, no passwd entries.
    sandbox_uids: str = "60000-60999"
    #: The uid environment builds (uv, setup.py) run as; never a job's, never labq's.
    build_uid: int = 59999
    #: Size of a job's private /tmp and of its /dev/shm (each).
    job_tmp_mb: int = 256
    #: Niceness of ``labq worker`` processes (0-19): the backend, which answers people,
    #: goes first. Jobs get ``job_nice`` (an absolute value, not added to this one).
    worker_nice: int = 5
    #: Niceness of job processes (0-19): jobs yield the CPU to labq's own services, so a
    #: host busy with jobs still takes uploads and answers the API at once.
    job_nice: int = 10
    #: Most processes and threads one job may have at once.
    job_max_procs: int = 512
    #: Most open files per job process.
    job_max_open_files: int = 4096
    #: Let jobs whose labq.toml says ``network = true`` reach the network.
    allow_network: bool = False

    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(Path(self.data_dir) / 'labq.db').resolve()}"

    @property
    def rabbitmq_urls(self) -> list[str]:
        return [u.strip() for u in self.rabbitmq_url.split(",") if u.strip()]

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
