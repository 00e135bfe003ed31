"""The exact package set of a job's environment: a lock, for receipts and reruns.

After the environment is ready the worker writes ``environment.json`` beside the
outcome: the Python version, the environment's cache key and the installed packages
with their exact versions (the resolved set, not the requirements the researcher wrote),
in ``uv pip freeze`` form. A rerun installs from that lock, so it gets the same packages
even if newer releases appeared since.

The packages are read from the environment's ``*.dist-info/METADATA`` files, never by
starting its interpreter: any installed package may carry a ``.pth`` file that runs at
every start of that interpreter, and the worker (root) must never run a job
environment's code outside the box. The list is computed once, by the worker, when the
build is sealed, and kept in the environment (``labq-lock.txt``).
"""

from __future__ import annotations

import email.parser
import functools
import json
import logging
import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

from labq.shared.storage import Storage

log = logging.getLogger(__name__)

LOCK_NAME = "labq-lock.txt"
#: What a rerun's worker finds in its job dir: the lock of the job it re-runs.
RERUN_LOCK = "rerun-lock.txt"


@functools.cache  # read once per worker: the code it runs is the code it loaded
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


#: A METADATA file larger than this is not one uv wrote: not read.
MAX_METADATA_BYTES = 4 * 1024 * 1024
_NAME_RUNS = re.compile(r"[-_.]+")


def _canonical(name: str) -> str:
    """A distribution name as ``uv pip freeze`` prints it (PEP 503 normalized)."""
    return _NAME_RUNS.sub("-", name).lower()


def _read_small(path: Path, limit: int) -> str | None:
    """A regular file's text, never through a symlink (the build uid made these files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = handle.read(limit + 1)
    return data.decode("utf-8", "replace") if len(data) <= limit else None


def _direct_url(dist_info: Path) -> str | None:
    """Where a package installed from a URL came from (PEP 610), as freeze shows it."""
    text = _read_small(dist_info / "direct_url.json", 64 * 1024)
    if text is None:
        return None
    try:
        data = json.loads(text)
        url = data["url"]
    except (ValueError, KeyError, TypeError):
        return None
    vcs = data.get("vcs_info") or {}
    if vcs.get("vcs") and vcs.get("commit_id"):
        return f"{vcs['vcs']}+{url}@{vcs['commit_id']}"
    return url


def _site_packages(env_dir: Path) -> list[Path]:
    root = env_dir.resolve()
    found = []
    for lib in ("lib", "lib64"):
        for path in sorted((env_dir / lib).glob("python*/site-packages")):
            real = path.resolve()
            if real.is_relative_to(root) and real not in found:  # never outside the env
                found.append(real)
    return found


def installed_packages(env_dir: Path) -> list[str]:
    """The distributions installed in ``env_dir``, ``name==version`` (or ``name @ url``),
    sorted: what ``uv pip freeze`` prints, read from the files alone."""
    lines = set()
    for site in _site_packages(env_dir):
        for dist_info in site.glob("*.dist-info"):
            if dist_info.is_symlink():
                continue
            text = _read_small(dist_info / "METADATA", MAX_METADATA_BYTES)
            if text is None:
                continue
            headers = email.parser.HeaderParser().parsestr(text)
            name, version = headers.get("Name"), headers.get("Version")
            if not name or not version:
                continue
            url = _direct_url(dist_info)
            name = _canonical(name.strip())
            lines.add(f"{name} @ {url}" if url else f"{name}=={version.strip()}")
    return sorted(lines)


def write_lock(env_dir: Path) -> list[str]:
    """Compute the environment's lock and keep it in the environment (by the worker, once
    the build is sealed: whatever the build left under that name is replaced)."""
    lines = installed_packages(env_dir)
    cached = env_dir / LOCK_NAME
    tmp = cached.with_suffix(".tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:
        log.warning("could not keep the lock in %s", env_dir)
    return lines


def freeze(env_dir: Path) -> list[str]:
    """The environment's packages: the lock kept in it (written by the worker when it
    sealed the build), else read from its files now."""
    cached = env_dir / LOCK_NAME
    if not cached.is_symlink() and cached.is_file():
        return cached.read_text(encoding="utf-8").splitlines()
    return write_lock(env_dir)


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
