"""The optional ``labq.toml`` manifest of a bundle, resolved against server limits.

A researcher may write, at the top of their project folder::

    entrypoint = "train.py"          # default: code.py, else main_script.py
    args = ["--epochs", "3"]
    timeout_s = 3600                  # wall clock; outcome "timeout" when reached
    memory_mb = 2048                  # the job is killed past this; outcome "error"
    cpus = 2                          # CPUs the job may use
    max_output_mb = 500               # largest output/ accepted

    notify_url = "https://hooks.example.org/labq"   # a JSON POST when the job ends

    [env]
    SEED = "42"

    [sweep]                           # one job per combination (shared/sweep.py)
    lr = [0.1, 0.01]

Anything missing takes the server default (``LABQ_DEFAULT_*``); anything above the
server maximum (``LABQ_MAX_*``) or malformed is a :class:`ManifestError` (HTTP 422)
naming the field and the reason, raised at upload, before anything is queued.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from labq.shared.errors import ManifestError
from labq.shared.settings import MIB, Settings

MANIFEST_NAME = "labq.toml"
KNOWN_KEYS = {
    "entrypoint", "args", "timeout_s", "memory_mb", "cpus", "max_output_mb", "env", "name",
    "sweep", "notify_url", "network",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Variables a job may not set: they would let user code reach into labq or its runtime.
_RESERVED_ENV = re.compile(r"^(LABQ_.*|PATH|HOME|VIRTUAL_ENV|PYTHONHOME|PYTHONPATH|LD_.*)$")


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to know to run a job, after validation and resolution."""

    entrypoint: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: int = 0
    memory_mb: int = 0
    cpus: int = 0
    max_output_bytes: int = 0
    #: The job may reach the network (only if the server allows it: LABQ_ALLOW_NETWORK).
    network: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """A spec as stored (``jobs.spec``) or sent (``JobMessage.spec``); ValueError or
        TypeError for anything that is not one."""
        args, env = data.get("args", []), data.get("env", {})
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError("args must be a list of strings")
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env must map strings to strings")
        entrypoint = data["entrypoint"]
        if not isinstance(entrypoint, str) or not entrypoint:
            raise ValueError("entrypoint must be a file name")
        numbers = {}
        for name in ("timeout_s", "memory_mb", "cpus", "max_output_bytes"):
            value = data.get(name) or 0
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            numbers[name] = int(value)
        return cls(entrypoint=entrypoint, args=list(args), env=dict(env),
                   network=bool(data.get("network", False)), **numbers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entrypoint": self.entrypoint,
            "args": list(self.args),
            "env": dict(self.env),
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "cpus": self.cpus,
            "max_output_bytes": self.max_output_bytes,
            "network": self.network,
        }


def parse_manifest(text: bytes) -> dict[str, Any]:
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError("labq.toml is not UTF-8 text", field="labq.toml") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"labq.toml is not valid TOML: {exc}", field="labq.toml") from exc
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        raise ManifestError(
            f"labq.toml has unknown field(s) {', '.join(unknown)}; "
            f"known fields are {', '.join(sorted(KNOWN_KEYS))}",
            field=unknown[0],
        )
    return data


def _positive_int(data: dict[str, Any], key: str, default: int, maximum: int) -> int:
    if key not in data:
        # An admin may lower a maximum below the default; the maximum wins.
        return min(default, maximum) if maximum and default else default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(f"{key} must be a whole number, got {value!r}", field=key)
    if value <= 0:
        raise ManifestError(f"{key} must be greater than 0, got {value}", field=key)
    if maximum and value > maximum:
        raise ManifestError(
            f"{key} = {value} is more than this server allows (at most {maximum})",
            field=key,
            maximum=maximum,
        )
    return value


def check_env_name(name: Any, field: str) -> None:
    """A name a job may set in its environment (``[env]`` and ``[sweep]`` alike)."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ManifestError(f"{field} name {name!r} is not a valid variable name", field=field)
    if _RESERVED_ENV.match(name):
        raise ManifestError(f"{field} name {name!r} is reserved by labq", field=field)


def resolve_spec(data: dict[str, Any], entrypoint: str, settings: Settings) -> JobSpec:
    """Apply server defaults and maxima to a parsed manifest (form overrides merged in)."""
    args = data.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str | int | float) for a in args):
        raise ManifestError("args must be a list of strings", field="args")
    env_in = data.get("env", {})
    if not isinstance(env_in, dict):
        raise ManifestError("env must be a table of NAME = \"value\" pairs", field="env")
    env: dict[str, str] = {}
    for name, value in env_in.items():
        check_env_name(name, field="env")
        if not isinstance(value, str | int | float | bool):
            raise ManifestError(f"env {name} must be a string, got {value!r}", field="env")
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    max_output_mb = settings.max_output_bytes // MIB
    default_output_mb = settings.default_max_output_bytes // MIB
    network = data.get("network", False)
    if not isinstance(network, bool):
        raise ManifestError("network must be true or false", field="network")
    if network and not settings.allow_network:
        raise ManifestError("this server does not let jobs reach the network (network = "
                            "true); remove it, or ask the lab's admin (LABQ_ALLOW_NETWORK)",
                            field="network")
    return JobSpec(
        entrypoint=entrypoint,
        args=[str(a) for a in args],
        env=env,
        timeout_s=_positive_int(
            data, "timeout_s", settings.default_timeout_s, settings.max_timeout_s
        ),
        memory_mb=_positive_int(
            data, "memory_mb", settings.default_memory_mb, settings.max_memory_mb
        ),
        cpus=_positive_int(data, "cpus", settings.default_cpus, settings.max_cpus),
        max_output_bytes=_positive_int(data, "max_output_mb", default_output_mb, max_output_mb)
        * MIB,
        network=network,
    )
