"""The exact package set of a job's environment: a lock, for receipts and reruns.

After the environment is ready the worker writes ``environment.json`` beside the
outcome: the Python version, the environment's cache key and ``uv pip freeze`` of the
built environment (the resolved packages with exact versions, not the requirements the
researcher wrote). A rerun installs from that lock, so it gets the same packages even if
newer releases appeared since. The freeze is kept in the environment itself
(``labq-lock.txt``) so it is computed once per environment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from labq.process_unit.envcache import uv_binary
from labq.shared.errors import EnvironmentBuildError
from labq.shared.storage import Storage

log = logging.getLogger(__name__)

LOCK_NAME = "labq-lock.txt"
#: What a rerun's worker finds in its job dir: the lock of the job it re-runs.
RERUN_LOCK = "rerun-lock.txt"
FREEZE_TIMEOUT_S = 120


def labq_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("labq")
    except PackageNotFoundError:
        return "unknown"


def python_version(env_dir: Path) -> str | None:
    """The interpreter's version from the venv's pyvenv.cfg (``version_info`` or ``version``)."""
    try:
        text = (env_dir / "pyvenv.cfg").read_text(encoding="utf-8")
    except OSError:
        return None
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    values = {k.strip(): v.strip() for k, v in values.items()}
    return values.get("version_info") or values.get("version")


def freeze(env_dir: Path) -> list[str]:
    """``uv pip freeze`` of the environment, cached in it; [] when uv cannot tell."""
    cached = env_dir / LOCK_NAME
    if cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
    env.pop("VIRTUAL_ENV", None)
    try:
        result = subprocess.run(
            [uv_binary(), "pip", "freeze", "--python", str(env_dir / "bin" / "python")],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
            timeout=FREEZE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired, EnvironmentBuildError) as exc:
        log.warning("could not list the packages of %s: %s", env_dir, exc)
        return []
    if result.returncode != 0:
        log.warning("uv pip freeze failed for %s: %s", env_dir, result.stderr.strip()[-500:])
        return []
    lines = sorted(line for line in result.stdout.splitlines() if line.strip())
    tmp = cached.with_suffix(".tmp")
    try:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:
        log.warning("could not cache the lock in %s", env_dir)
    return lines


def record_environment(storage: Storage, job_id: str, env_dir: Path) -> dict[str, Any]:
    """Write ``environment.json`` for the job (atomically) and return it."""
    data = {"env_key": env_dir.name, "python": python_version(env_dir),
            "packages": freeze(env_dir), "worker_host": socket.gethostname(),
            "labq_version": labq_version()}
    write_environment(storage, job_id, data)
    return data


def write_environment(storage: Storage, job_id: str, data: dict[str, Any]) -> None:
    path = storage.job_dir(job_id) / "environment.json"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # never write through a link a job left there
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_environment(storage: Storage, job_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((storage.job_dir(job_id) / "environment.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
