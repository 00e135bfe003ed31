"""Messages and events that travel on RabbitMQ, as frozen dataclasses.

Each has ``encode() -> bytes`` (JSON with ``schema_version`` and ``kind``) and a
classmethod ``decode(bytes)`` that raises :class:`DecodeError` for anything it cannot
read; undecodable job messages are dead-lettered, never retried.

* :class:`JobMessage` — the claim check on the jobs queue: ids, the bundle's content
  hash and the resolved :class:`JobSpec`; never the bundle itself.
* :class:`LifecycleEvent` — a state change, routing key ``<job id>.lifecycle``, with a
  per-job sequence number so stale or repeated events are dropped.
* :class:`StatusEvent` — about once a second while a job runs (``<job id>.status``).
* :class:`ControlMessage` — pause/resume/stop for the worker holding a job
  (``<job id>.control`` on the control exchange).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Self

from labq.shared.errors import DecodeError
from labq.shared.lifecycle import CONTROL_ACTIONS
from labq.shared.manifest import JobSpec

SPEC_FIELDS = ("entrypoint", "args", "env", "timeout_s", "memory_mb", "cpus",
               "max_output_bytes", "network")

SCHEMA_VERSION = 1
#: Sequence numbers are ``attempt * SEQ_PER_ATTEMPT + n`` so a retry's events always
#: sort after every event of the attempt before it, without any shared counter.
SEQ_PER_ATTEMPT = 1000


def event_seq(attempt: int, n: int) -> int:
    return attempt * SEQ_PER_ATTEMPT + n


@dataclass(frozen=True)
class _Message:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, **asdict(self)}

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if not isinstance(data, dict):
            raise DecodeError(f"a {cls.kind} message must be a JSON object")
        if data.get("kind") != cls.kind:
            raise DecodeError(f"expected a {cls.kind!r} message, got kind={data.get('kind')!r}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DecodeError(f"unsupported schema_version {version!r} (expected 1)")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            message = cls(**values)
        except TypeError as exc:
            raise DecodeError(f"bad {cls.kind} message: {exc}") from exc
        message._check()
        return message

    @classmethod
    def decode(cls, body: bytes) -> Self:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"not JSON: {exc}") from exc
        return cls.from_dict(data)

    def _check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = str(f.type)
            if value is None and "None" in expected:
                continue
            ok = {
                "str": isinstance(value, str),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, int | float) and not isinstance(value, bool),
            }.get(expected.split(" |")[0], True)
            if not ok:
                raise DecodeError(f"field {f.name!r} of a {self.kind} message must be {expected}")


@dataclass(frozen=True)
class JobMessage(_Message):
    """The claim check: which job, which bundle, and the resolved spec to run it with."""

    kind: ClassVar[str] = "job"

    job_id: str
    name: str
    bundle_sha256: str
    spec: JobSpec
    submitted_at: float = 0.0
    #: A job id whose recorded environment lock replaces requirements.txt (a rerun).
    lock_of: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "spec": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if isinstance(data, dict) and "spec" not in data and "entrypoint" in data:
            # The flat layout of labq before 0.3 (a message queued across an upgrade).
            data = {**data, "spec": {k: data[k] for k in SPEC_FIELDS if k in data}}
        if isinstance(data, dict) and isinstance(data.get("spec"), dict):
            try:
                data = {**data, "spec": JobSpec.from_dict(data["spec"])}
            except (KeyError, ValueError, TypeError) as exc:
                raise DecodeError(f"bad job spec: {exc}") from exc
        elif isinstance(data, dict):
            raise DecodeError("a job message needs a spec object")
        return super().from_dict(data)

    def _check(self) -> None:
        super()._check()
        if not self.job_id or not self.bundle_sha256:
            raise DecodeError("a job message needs job_id and bundle_sha256")


@dataclass(frozen=True)
class LifecycleEvent(_Message):
    kind: ClassVar[str] = "lifecycle"

    job_id: str
    seq: int
    state: str
    attempt: int = 0
    outcome: str | None = None
    exit_code: int | None = None
    error: str | None = None
    worker: str | None = None
    #: The host the worker runs on (``socket.gethostname()``): with workers on several
    #: machines, where the job ran. Older workers leave it out.
    worker_host: str | None = None
    at: float = field(default_factory=time.time)
    #: Measurements (shared.durations.MEASURES): on ``initialized`` the seconds spent
    #: preparing the run, on the final events the run's peak memory and CPU time.
    env_s: float | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None

    @property
    def routing_key(self) -> str:
        return f"{self.job_id}.lifecycle"


@dataclass(frozen=True)
class StatusEvent(_Message):
    kind: ClassVar[str] = "status"

    job_id: str
    state: str
    elapsed_s: float
    attempt: int = 0
    worker: str | None = None
    memory_mb: float | None = None
    at: float = field(default_factory=time.time)
    #: CPU seconds the job's processes used so far (for the live chart).
    cpu_s: float | None = None

    @property
    def routing_key(self) -> str:
        return f"{self.job_id}.status"


@dataclass(frozen=True)
class ControlMessage(_Message):
    kind: ClassVar[str] = "control"

    job_id: str
    action: str
    at: float = field(default_factory=time.time)

    def _check(self) -> None:
        super()._check()
        if self.action not in CONTROL_ACTIONS:
            raise DecodeError(f"unknown control action {self.action!r}")

    @property
    def routing_key(self) -> str:
        return f"{self.job_id}.control"


def decode_event(body: bytes) -> LifecycleEvent | StatusEvent:
    """Decode anything published on the events exchange."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"not JSON: {exc}") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == LifecycleEvent.kind:
        return LifecycleEvent.from_dict(data)
    if kind == StatusEvent.kind:
        return StatusEvent.from_dict(data)
    raise DecodeError(f"unknown event kind {kind!r}")
