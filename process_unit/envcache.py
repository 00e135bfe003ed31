"""Job environments, built with uv and cached on the worker's host.

``<work dir>/envs/<key>/`` is a virtual environment, where ``key`` is the sha256 of the
normalized ``requirements.txt`` and the interpreter (path and version). A bundle with
no requirements gets an empty venv of its own, never labq's environment.

Safety between the workers of one host (the work dir is local to each host; with
several hosts each builds and caches its own environments):

* ``<work dir>/envs/.<key>.lock`` is flock'ed exclusively while an environment is built
  and shared while a job uses it, so eviction never removes an environment in use;
* it is built in a temporary folder (``uv venv --relocatable``) and renamed into
  place, so nobody ever sees half an environment;
* ``.labq-used`` inside it is touched on every use; past ``env_cache_max_bytes``
  the least recently used environments that nobody holds are removed.

With a :class:`~labq.process_unit.envbuild.BuildBox` (the worker's sandbox) uv runs
boxed (process_unit/envbuild.py): as the unprivileged build uid inside bubblewrap, in a
cgroup with a job's limits, seeing the system read-only, the folder being built, uv's
cache and the job's requirements — not the data dir. An install goes in two steps, so
that no package's code ever runs where it could poison what other builds use:

1. **wheels only** (``--no-build``): no package code runs, so uv may use and fill the
   shared cache (``<work dir>/uv-cache``, owned by the build uid);
2. only when a package must be built from source (its ``setup.py`` or build backend
   runs): the same install again in a fresh venv, with a cache of this build alone that
   is thrown away afterwards. The shared cache is not even mounted: a malicious build
   can spoil nothing but its own environment. Such a build needs a network of its own
   (slirp4netns, without the host's loopback) or none (``LABQ_UV_OFFLINE``); a worker
   that can give neither refuses it, saying what to install.

The built environment then belongs to the worker and is read-only to everyone else,
jobs included; its package list is read by the worker from the files (envlock.py).
The build's time limit and a stop asked for during the build end it.
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
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from labq.process_unit.envbuild import (
    BuildBox,
    BuildStoppedError,
    Network,
    UvCommand,
    UvRunner,
    uv_binary,
)
from labq.process_unit.envlock import write_lock
from labq.shared.errors import EnvironmentBuildError
from labq.shared.settings import Settings
from labq.shared.storage import Storage

__all__ = ["BuildBox", "BuildStoppedError", "EnvCache", "uv_binary"]

log = logging.getLogger(__name__)

USED_MARKER = ".labq-used"
#: What uv says when ``--no-build`` met a package it would have to build from source.
NEEDS_SOURCE_BUILD = ("--no-build", "building source distributions is disabled",
                      "building from source is disabled", "has no usable wheels")


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


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _chown_tree(path: Path, uid: int) -> None:
    os.lchown(path, uid, uid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)


def _seal(path: Path) -> None:
    """The worker owns the built environment; nobody else may write to it."""
    _chown_tree(path, os.getuid())
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                mode = os.lstat(full).st_mode
                os.chmod(full, (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022)
    os.chmod(path, 0o755)


class EnvCache:
    def __init__(self, settings: Settings, storage: Storage | None = None,
                 box: BuildBox | None = None) -> None:
        self.settings = settings
        self.box = box
        self.storage = storage or Storage(settings.data_dir)
        # Host-local (the work dir), not the shared volume: environments are per host
        # (interpreter paths differ), and job uids must be able to reach them.
        self.root = settings.resolved_work_dir / "envs"
        self.python = settings.job_python or sys.executable
        self.uv_cache = settings.resolved_work_dir / "uv-cache"
        self.runner = UvRunner(settings, box)
        self._deadline = time.monotonic() + settings.env_build_timeout_s

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
    def acquire(self, requirements: Path | None, log_file: BinaryIO,
                cancelled: Callable[[], bool] | None = None) -> Iterator[Path]:
        """Yield a ready environment for ``requirements`` (None: no requirements).

        Builds it if needed; uv's output is appended to ``log_file``. The environment
        is held (shared lock) until the context exits. ``cancelled`` is asked while uv
        runs: when it turns true the build is killed (a user's stop).
        """
        self._cancelled = cancelled or (lambda: False)
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

    # -- building ------------------------------------------------------------------
    def _run_uv(self, cmd: UvCommand, log_file: BinaryIO) -> list[str]:
        return self.runner.run(cmd, log_file, deadline=self._deadline,
                               cancelled=getattr(self, "_cancelled", lambda: False))

    def _index_network(self) -> Network | None:
        """The network an install that may run package code gets (None: none may be
        given: online, without slirp4netns)."""
        if self.box is None:
            return Network.HOST  # unboxed (LABQ_SANDBOX=off): as the worker, as is
        if self.settings.uv_offline:
            return Network.NONE
        if self.box.bwrap and self.box.slirp:
            return Network.OWN
        return None

    def _make_venv(self, tmp: Path, ro_binds: list[Path], log_file: BinaryIO) -> None:
        self._run_uv(UvCommand(
            ["venv", "--relocatable", "--no-config", "--python", self.python, str(tmp)],
            "creating the environment", self.uv_cache, [tmp], ro_binds), log_file)

    def _install(self, tmp: Path, requirements: Path, ro_binds: list[Path],
                 log_file: BinaryIO) -> None:
        """Install requirements.txt into the venv at ``tmp``: wheels only first, with the
        shared cache; from source only if needed, with a cache of this build alone."""
        cmd = ["pip", "install", "--no-config", "--python", str(tmp / "bin" / "python"),
               "-r", str(requirements)]
        if self.settings.uv_offline:
            cmd.append("--offline")
        if self.settings.uv_find_links:
            cmd += ["--find-links", self.settings.uv_find_links]
        what = "installing requirements.txt"
        network = self._index_network()
        if self.box is None:
            self._run_uv(UvCommand(cmd, what, self.uv_cache, [tmp], ro_binds), log_file)
            return
        # uv alone may use the host's network when nothing better exists: no package's
        # code runs in a wheels-only install.
        wheels = UvCommand([*cmd, "--no-build"], what, self.uv_cache, [tmp], ro_binds,
                           network or Network.HOST)
        try:
            self._run_uv(wheels, log_file)
            return
        except BuildStoppedError:
            raise
        except EnvironmentBuildError as exc:
            if not any(hint in exc.message.lower() for hint in NEEDS_SOURCE_BUILD):
                raise
        if network is None or not self.box.bwrap:
            raise EnvironmentBuildError(
                "a package of requirements.txt must be built from source, and this worker "
                "cannot give a build from source a box of its own ("
                + ("no bubblewrap" if not self.box.bwrap else
                   "no slirp4netns: it would share the host's network, loopback included")
                + "): install bubblewrap and slirp4netns on the worker, or use wheels only")
        _note(log_file, "labq: a package must be built from source (see above): installing "
                        "again, building it in a cache of this build alone")
        self._source_build(tmp, cmd, what, network, ro_binds, log_file)

    def _source_build(self, tmp: Path, cmd: list[str], what: str, network: Network,
                      ro_binds: list[Path], log_file: BinaryIO) -> None:
        """The install with package code running: a fresh venv, and a private uv cache
        that is thrown away, so nothing it does reaches another build."""
        assert self.box is not None
        shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        name = tmp.name.removeprefix(".build-")
        private = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-cache-{name}"))
        try:
            if self.box.uid is not None:
                for path in (tmp, private):
                    os.chown(path, self.box.uid, self.box.uid)
            self._make_venv(tmp, ro_binds, log_file)
            self._run_uv(UvCommand(cmd, what, private, [tmp], ro_binds, network), log_file)
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def _build(self, key: str, requirements: Path | None, log_file: BinaryIO) -> None:
        env = self.root / key
        _note(log_file, f"labq: building environment {key[:12]} with uv")
        started = time.monotonic()
        self._deadline = started + self.settings.env_build_timeout_s
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key[:12]}-"))
        self.uv_cache.mkdir(parents=True, exist_ok=True)
        ro_binds = [requirements.parent] if requirements is not None else []
        if self.settings.uv_find_links and Path(self.settings.uv_find_links).is_dir():
            ro_binds.append(Path(self.settings.uv_find_links))
        if self.box is not None and self.box.uid is not None:
            _chown_tree(tmp, self.box.uid)
            # Only the build uid writes uv's cache: hand it over once, not at every build.
            if self.uv_cache.stat().st_uid != self.box.uid:
                _chown_tree(self.uv_cache, self.box.uid)
        try:
            self._make_venv(tmp, ro_binds, log_file)
            if requirements is not None:
                self._install(tmp, requirements, ro_binds, log_file)
            (tmp / USED_MARKER).touch()
            # Built by the build uid (or in a 0700 mkdtemp): the worker takes it over, and
            # every job uid may read and run it, none may write.
            _seal(tmp)
            write_lock(tmp)  # read from the files by the worker: no interpreter started
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
