"""Job environments, built with uv and cached on the worker's host.

``<work dir>/envs/<key>/`` is a virtual environment, where ``key`` is the sha256 of the
normalized ``requirements.txt`` and the interpreter (path and version). A bundle with
no requirements gets an empty venv of its own, never labq's environment.

Safety between workers (possibly on several hosts sharing the volume):

* ``<data>/envs/.<key>.lock`` is flock'ed exclusively while an environment is built
  and shared while a job uses it, so eviction never removes an environment in use;
* it is built in a temporary folder (``uv venv --relocatable``) and renamed into
  place, so nobody ever sees half an environment;
* ``.labq-used`` inside it is touched on every use; past ``env_cache_max_bytes``
  the least recently used environments that nobody holds are removed.

With a :class:`BuildBox` (the worker's sandbox), uv — and whatever a package's
``setup.py`` runs — runs as the unprivileged build uid inside bubblewrap: it sees the
system read-only, the folder being built, uv's cache and the job's requirements, and
not the data dir; it keeps the host's network (for the package index). The built
environment then belongs to the worker and is read-only to everyone else, jobs included.
A stop asked for during the build ends it.
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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from labq.process_unit.netbox import RESOLV_CONF, JobNetwork, slirp_binary
from labq.shared.errors import EnvironmentBuildError
from labq.shared.settings import Settings
from labq.shared.storage import Storage

log = logging.getLogger(__name__)

USED_MARKER = ".labq-used"
#: Variables a boxed build keeps from the worker's environment: uv's own settings, CA
#: certificates and proxies (how to reach the index), nothing else.
BUILD_ENV_KEEP = ("UV_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY",
                  "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


class BuildStoppedError(EnvironmentBuildError):
    """Raised when the user stopped a job while its environment was being built."""

    code = "build_stopped"
#: Lines of uv's output left out of the job log: terminal advice about a temporary path.
UV_TERMINAL_HINTS = ("Activate with:",)
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


@dataclass(frozen=True)
class BuildBox:
    """How builds are boxed: run as ``uid`` via the launcher, inside ``bwrap`` if set."""

    uid: int
    bwrap: str | None = None


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

    def _uv_env(self) -> dict[str, str]:
        # uv needs no labq setting; keep broker/database URLs away from it too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        if self.box is not None:
            # Boxed: from scratch, keeping only how to reach the package index.
            env = {k: v for k, v in env.items() if k.startswith(BUILD_ENV_KEEP)}
            env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME="/tmp", LANG="C.UTF-8",
                       # The cache and the environment are separate bind mounts (no
                       # hardlinks across them), and jobs never see the cache: copy.
                       UV_LINK_MODE="copy")
        env.pop("VIRTUAL_ENV", None)
        env["UV_CACHE_DIR"] = str(self.uv_cache)
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        return env

    def _boxed_uv(self, args: list[str], binds: list[Path], ro_binds: list[Path],
                  net: JobNetwork | None = None) -> list[str]:
        """uv's argv: as is, or through the launcher as the build uid inside bwrap (with
        ``net``: in a network namespace of its own, routed out by slirp4netns)."""
        uv = self._uv_copy() if self.box else uv_binary()
        if self.box is None:
            return [uv, *args]
        from labq.process_unit.isolation import system_links
        from labq.process_unit.sandbox import LAUNCHER

        launch = [sys.executable, "-I", "-S", str(LAUNCHER), "--parent", str(os.getpid()),
                  "--rlimit", "CORE=0", "--uid", str(self.box.uid)]
        if net is not None:
            launch += ["--netns", ",".join(str(fd) for fd in net.child_fds())]
        launch.append("--")
        if not self.box.bwrap:
            return [*launch, uv, *args]
        resolv = ["--ro-bind", str(self._resolv_conf()), "/etc/resolv.conf"] if net else []
        jail = [self.box.bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr", *system_links(), "--ro-bind", "/etc", "/etc",
                *resolv,
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--ro-bind", uv, uv]
        for path in ro_binds:
            jail += ["--ro-bind", str(path), str(path)]
        for path in binds:
            jail += ["--bind", str(path), str(path)]
        return [*launch, *jail, "--remount-ro", "/", uv, *args]

    def _resolv_conf(self) -> Path:
        path = self.settings.resolved_work_dir / "bin" / "resolv.conf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(RESOLV_CONF)
            os.chmod(path, 0o644)
        return path

    def _uv_copy(self) -> str:
        """uv, copied where the build uid may run it (labq's own venv may be private)."""
        target = self.settings.resolved_work_dir / "bin" / "uv"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".uv.{os.getpid()}")
            shutil.copy2(uv_binary(), tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        return str(target)

    def _run_uv(self, args: list[str], log_file: BinaryIO, what: str,
                binds: list[Path] | None = None, ro_binds: list[Path] | None = None) -> None:
        """Run uv with its output copied line by line into the job log, minus lines that
        only make sense in a terminal (``Activate with: source <temporary path>``)."""
        log_file.flush()
        proc, net = self._start_uv(args, binds or [], ro_binds or [])
        watch = _BuildWatch(proc, self.settings.env_build_timeout_s,
                            getattr(self, "_cancelled", lambda: False))
        try:
            kept = _copy_uv_output(proc, log_file)
            returncode = proc.wait()
        finally:
            watch.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if net is not None:
                net.close()
        if watch.stopped.is_set():
            raise BuildStoppedError(f"{what} was stopped by the user")
        if watch.expired.is_set():
            raise EnvironmentBuildError(
                f"{what} took longer than {self.settings.env_build_timeout_s} s; gave up")
        if returncode != 0:
            # uv's chatter about which interpreter it uses says nothing about the failure.
            lines = [line for line in kept if line.strip()
                     and not line.startswith(("Using Python", "Using CPython"))]
            tail = "\n".join(lines)[-ERROR_TAIL_CHARS:]
            tail = tail or f"uv exited {returncode}"
            raise EnvironmentBuildError(f"{what} failed: {tail}")

    def _start_uv(self, args: list[str], binds: list[Path],
                  ro_binds: list[Path]) -> tuple[subprocess.Popen, JobNetwork | None]:
        # A boxed build reaches the package index through slirp4netns, never the host's
        # loopback (the broker, the database): what a package's setup.py does included.
        # Without slirp4netns it shares the host's network (the README says so).
        net = JobNetwork.prepare() if self.box and self.box.bwrap and slirp_binary() \
            else None
        proc = None
        try:
            proc = subprocess.Popen(
                self._boxed_uv(args, binds, ro_binds, net),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self._uv_env(), start_new_session=True,
                pass_fds=net.child_fds() if net else ())
            if net is not None:
                net.start()
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            if net is not None:
                net.close()
            raise
        return proc, net

    def _build(self, key: str, requirements: Path | None, log_file: BinaryIO) -> None:
        env = self.root / key
        _note(log_file, f"labq: building environment {key[:12]} with uv")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".build-{key[:12]}-"))
        self.uv_cache.mkdir(parents=True, exist_ok=True)
        binds = [tmp, self.uv_cache]
        ro_binds = [requirements.parent] if requirements is not None else []
        if self.settings.uv_find_links and Path(self.settings.uv_find_links).is_dir():
            ro_binds.append(Path(self.settings.uv_find_links))
        if self.box is not None:
            _chown_tree(tmp, self.box.uid)
            # Only the build uid writes uv's cache: hand it over once, not at every build.
            if self.uv_cache.stat().st_uid != self.box.uid:
                _chown_tree(self.uv_cache, self.box.uid)
        try:
            self._run_uv(
                ["venv", "--relocatable", "--no-config", "--python", self.python, str(tmp)],
                log_file, "creating the environment", binds, ro_binds,
            )
            if requirements is not None:
                cmd = ["pip", "install", "--no-config", "--python", str(tmp / "bin" / "python"),
                       "-r", str(requirements)]
                if self.settings.uv_offline:
                    cmd.append("--offline")
                if self.settings.uv_find_links:
                    cmd += ["--find-links", self.settings.uv_find_links]
                self._run_uv(cmd, log_file, "installing requirements.txt", binds, ro_binds)
            (tmp / USED_MARKER).touch()
            # Built by the build uid (or in a 0700 mkdtemp): the worker takes it over, and
            # every job uid may read and run it, none may write.
            _seal(tmp)
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


class _BuildWatch:
    """Ends a running uv when it outlives its time limit or the user stops the job."""

    def __init__(self, proc: subprocess.Popen, timeout_s: float,
                 cancelled: Callable[[], bool]) -> None:
        self.proc = proc
        self.cancelled = cancelled
        self.expired = threading.Event()
        self.stopped = threading.Event()
        self.done = threading.Event()
        self.timer = threading.Timer(timeout_s, self._expire)
        self.timer.start()
        threading.Thread(target=self._watch_stop, name="labq-build-stop", daemon=True).start()

    def _expire(self) -> None:
        self.expired.set()
        self.proc.kill()

    def _watch_stop(self) -> None:
        while not self.done.wait(0.2):
            if self.cancelled():
                self.stopped.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                return

    def close(self) -> None:
        self.done.set()
        self.timer.cancel()


def _copy_uv_output(proc: subprocess.Popen, log_file: BinaryIO) -> list[str]:
    """Copy uv's output into the job log as it comes; return the lines kept."""
    kept: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        if line.lstrip().startswith(UV_TERMINAL_HINTS):
            continue
        log_file.write(raw)
        log_file.flush()
        kept.append(line.rstrip("\n"))
    return kept
