"""Job environments, built with uv and cached on the data volume.

``<data>/envs/<key>/`` is a virtual environment, where ``key`` is the sha256 of the
normalized ``requirements.txt`` and the interpreter (path and version). A bundle with
no requirements gets an empty venv of its own, never labq's environment.

Safety between workers (possibly on several hosts sharing the volume):

* ``<data>/envs/.<key>.lock`` is flock'ed exclusively while an environment is built
  and shared while a job uses it, so eviction never removes an environment in use;
* it is built in a temporary folder (``uv venv --relocatable``) and renamed into
  place, so nobody ever sees half an environment;
* ``.labq-used`` inside it is touched on every use; past ``env_cache_max_bytes``
  the least recently used environments that nobody holds are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from shared.errors import EnvironmentBuildError
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)

USED_MARKER = ".labq-used"
#: How much of uv's message goes into the job's ``error`` field.
ERROR_TAIL_CHARS = 1500


def normalize_requirements(text: str) -> str:
    """Requirements without comments, blank lines and ordering differences."""
    lines = set()
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.add(line)
    return "\n".join(sorted(lines))


_INCLUDE = re.compile(r"^(-r|-c|--requirement|--constraint)(\s*=?\s*)(\S+)")
_LOCAL = re.compile(r"^(\.{1,2}/|/|file:)")


def referenced_files(requirements: Path, _seen: set[Path] | None = None) -> list[Path]:
    """Project files a requirements file pulls in: ``-r``/``-c`` includes (recursively)
    and local wheels or folders. Their content must be part of the cache key, or two
    projects with the same ``-r base.txt`` line would share one environment."""
    seen = _seen if _seen is not None else {requirements.resolve()}
    found: list[Path] = []
    base = requirements.parent
    for raw in requirements.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.split(" #", 1)[0].strip()
        include = _INCLUDE.match(line)
        target = include.group(3) if include else (line if _LOCAL.match(line) else None)
        if target is None:
            continue
        path = (base / target.removeprefix("file:").split("#", 1)[0]).resolve()
        if path in seen or not path.exists():
            continue
        seen.add(path)
        found.append(path)
        if include and path.is_file():
            found.extend(referenced_files(path, seen))
    return found


def _content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=8)
def interpreter_identity(python: str) -> str:
    """Path and full version of an interpreter (part of the cache key)."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version); print(sys.base_prefix)"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvironmentBuildError(f"the job interpreter {python!r} does not run: {exc}") from exc
    return f"{python}\n{out.strip()}"


def uv_binary() -> str:
    try:
        from uv import find_uv_bin  # the PyPI package ships the binary

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvironmentBuildError("uv is not installed on this worker")


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class EnvCache:
    def __init__(self, settings: Settings, storage: Storage | None = None) -> None:
        self.settings = settings
        self.storage = storage or Storage(settings.data_dir)
        self.root = self.storage.envs
        self.python = settings.job_python or sys.executable
        self.uv_cache = self.storage.root / "uv-cache"

    def key(self, requirements: str, included: list[Path] | None = None) -> str:
        material = normalize_requirements(requirements) + "\n--\n" + interpreter_identity(
            self.python
        )
        for path in included or []:
            material += f"\n{path.name}:{_content_digest(path)}"
        return hashlib.sha256(material.encode()).hexdigest()

    def _lock_path(self, key: str) -> Path:
        return self.root / f".{key}.lock"

    @contextlib.contextmanager
    def acquire(self, requirements: Path | None, log_file: BinaryIO) -> Iterator[Path]:
        """Yield a ready environment for ``requirements`` (None: no requirements).

        Builds it if needed; uv's output is appended to ``log_file``. The environment
        is held (shared lock) until the context exits.
        """
        text = requirements.read_text(encoding="utf-8", errors="replace") if requirements else ""
        self.root.mkdir(parents=True, exist_ok=True)
        key = self.key(text, referenced_files(requirements) if requirements else None)
        env = self.root / key
        built = False
        with open(self._lock_path(key), "a+b") as lock:
            for _ in range(5):
                # Shared while in use: eviction takes it exclusively and non-blocking.
                fcntl.flock(lock, fcntl.LOCK_SH)
                if (env / USED_MARKER).exists():
                    break
                fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another worker builds it
                if (env / USED_MARKER).exists():
                    _note(log_file, f"labq: environment {key[:12]} was built by another worker")
                else:
                    self._build(key, requirements, log_file)
                    built = True
            else:
                raise EnvironmentBuildError("the environment vanished while it was being taken")
            if not built:
                _note(log_file, f"labq: reusing environment {key[:12]}")
            os.utime(env / USED_MARKER)
            try:
                self.evict(keep=key)
            except OSError:
                log.exception("environment cache eviction failed")
            yield env

    def _uv_env(self) -> dict[str, str]:
        # uv needs no labq setting; keep broker/database URLs away from it too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        env.pop("VIRTUAL_ENV", None)
        env["UV_CACHE_DIR"] = str(self.uv_cache)
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        return env

    def _run_uv(self, args: list[str], log_file: BinaryIO, what: str) -> None:
        log_file.flush()
        start = log_file.tell()
        try:
            result = subprocess.run(
                [uv_binary(), *args], stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=log_file, env=self._uv_env(), timeout=self.settings.env_build_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentBuildError(
                f"{what} took longer than {self.settings.env_build_timeout_s} s; gave up"
            ) from exc
        if result.returncode != 0:
            log_file.flush()
            with open(log_file.name, "rb") as reader:
                reader.seek(start)
                text = reader.read().decode("utf-8", "replace")
            # uv's chatter about which interpreter it uses says nothing about the failure.
            lines = [line for line in text.splitlines() if line.strip()
                     and not line.startswith(("Using Python", "Using CPython"))]
            tail = "\n".join(lines)[-ERROR_TAIL_CHARS:]
            tail = tail or f"uv exited {result.returncode}"
            raise EnvironmentBuildError(f"{what} failed: {tail}")

    def _build(self, key: str, requirements: Path | None, log_file: BinaryIO) -> None:
        env = self.root / key
        _note(log_file, f"labq: building environment {key[:12]} with uv")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key[:12]}-"))
        try:
            self._run_uv(
                ["venv", "--relocatable", "--no-config", "--python", self.python, str(tmp)],
                log_file, "creating the environment",
            )
            if requirements is not None:
                cmd = ["pip", "install", "--no-config", "--python", str(tmp / "bin" / "python"),
                       "-r", str(requirements)]
                if self.settings.uv_offline:
                    cmd.append("--offline")
                if self.settings.uv_find_links:
                    cmd += ["--find-links", self.settings.uv_find_links]
                self._run_uv(cmd, log_file, "installing requirements.txt")
            (tmp / USED_MARKER).touch()
            if env.exists():  # a half-removed leftover (eviction or crash): replace it
                shutil.rmtree(env, ignore_errors=True)
            os.rename(tmp, env)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _note(log_file, f"labq: environment ready in {time.monotonic() - started:.1f} s")

    def evict(self, keep: str = "") -> list[str]:
        """Remove least recently used environments nobody holds until under budget."""
        budget = self.settings.env_cache_max_bytes
        envs = []
        stale_build = time.time() - 2 * self.settings.env_build_timeout_s
        for path in self.root.iterdir():
            if path.name.startswith(".build-") and path.stat().st_mtime < stale_build:
                # Left behind by a worker killed mid-build: nobody will finish it.
                shutil.rmtree(path, ignore_errors=True)
                continue
            marker = path / USED_MARKER
            if path.name.startswith(".") or not marker.exists():
                continue
            envs.append((marker.stat().st_mtime, path))
        sizes = {path: dir_bytes(path) for _, path in envs}
        total = sum(sizes.values())
        removed: list[str] = []
        for _, path in sorted(envs):
            if total <= budget:
                break
            if path.name == keep:
                continue
            with open(self._lock_path(path.name), "a+b") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use or being built
                # Remove the marker first: a half-deleted env is never taken as ready.
                (path / USED_MARKER).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
            removed.append(path.name)
            log.info("evicted environment %s (%d bytes)", path.name[:12], sizes[path])
        return removed


def _note(log_file: BinaryIO, text: str) -> None:
    log_file.write((text + "\n").encode())
    log_file.flush()
