"""The layout of the shared volume (``LABQ_DATA_DIR``) and safe writes to it.

::

    <data>/labq.db                      SQLite database (default)
    <data>/bundles/ab/<sha256>.zip      uploaded bundles, stored once by content hash
    <data>/jobs/<id>/log.txt            the job's combined stdout+stderr (all attempts)
    <data>/jobs/<id>/results.zip        zip of the job's output/
    <data>/jobs/<id>/results/           the same files, unpacked
    <data>/jobs/<id>/outcome.json       the worker's record of the outcome (written last)
    <data>/jobs/<id>/attempts.log       one line per attempt a worker started
    <data>/jobs/<id>/attempts.ended     one line per attempt that ended without an outcome
                                        on purpose (a worker shutting down put it back)
    <data>/jobs/<id>/cancelled          marker: a user stopped the job before it ran
    <data>/jobs/<id>/run.lock           held (flock) by the worker running the job
    <data>/workers/<name>.json          each worker's sandbox layers (for /readyz)
    <data>/tmp/                         uploads and results being written

The data dir is 0700 (only labq's user enters it). Environments and job workspaces are
not here but in each worker host's ``LABQ_WORK_DIR`` (``process_unit/isolation.py``).

Everything that readers may see is written to a temporary name and renamed into
place, so nobody ever reads half a file. The backend and the workers meet only here
and on RabbitMQ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from labq.shared.errors import LabqError, NotFoundError
from labq.shared.outcome import OutcomeRecord


class BundleTamperedError(LabqError):
    """Raised when a stored bundle's content no longer matches its sha256 name."""

    code = "bundle_tampered"
    status = 500


_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID.match(value or ""))


class Storage:
    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir).resolve()
        self.bundles = self.root / "bundles"
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"

    def ensure(self) -> Storage:
        for folder in (self.root, self.bundles, self.jobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        # Only labq's own user may enter the data dir: even a job that runs without
        # bubblewrap (as its own uid) cannot reach the database, bundles or logs.
        with contextlib.suppress(PermissionError):
            if self.root.stat().st_uid == os.geteuid():
                os.chmod(self.root, 0o700)
        return self

    # -- bundles --------------------------------------------------------------
    def bundle_path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise NotFoundError(f"no bundle {sha256!r}")
        return self.bundles / sha256[:2] / f"{sha256}.zip"

    def store_bundle(self, staged: Path, sha256: str) -> Path:
        """Move a staged upload to its content-addressed place.

        A file already there is kept only if its content still has that hash: one that
        was changed on the volume is replaced by the upload (whose hash was just taken),
        so a poisoned copy can never stand in for what a researcher sends.
        """
        final = self.bundle_path(sha256)
        if final.exists() and sha256_of(final) == sha256:
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
        return final

    def verify_bundle(self, sha256: str) -> Path:
        """The bundle's path once its content is checked against its name (the worker
        runs only what was uploaded); raises BundleTamperedError otherwise."""
        path = self.bundle_path(sha256)
        actual = sha256_of(path)
        if actual != sha256:
            raise BundleTamperedError(
                f"the stored bundle {sha256[:12]} no longer matches its sha256 (it is "
                f"{actual[:12]}): it was changed on the data volume; upload the job again")
        return path

    # -- per job --------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise NotFoundError(f"there is no job {job_id!r}")
        return self.jobs / job_id

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "log.txt"

    def results_zip(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "results.zip"

    def results_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "results"

    def outcome_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outcome.json"

    def lock_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "run.lock"

    def cancel_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "cancelled"

    def attempts_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "attempts.log"

    def open_job_file(self, job_id: str, name: str) -> IO[bytes] | None:
        """Open a job's file for reading, or None when it does not exist (yet).

        Jobs run with write access to their own folder, so a job could swap its log for
        a symlink to a secret of the host that serves it: neither the job folder nor the
        file may be a symlink, and only a regular file is served.
        """
        folder = self.job_dir(job_id)
        try:
            if stat.S_ISLNK(os.lstat(folder).st_mode):
                raise NotFoundError(f"job {job_id}'s folder is not a real folder")
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:  # ELOOP: the file is a symlink
            raise NotFoundError(f"job {job_id}'s {name} is not a regular file") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise NotFoundError(f"job {job_id}'s {name} is not a regular file")
        return os.fdopen(fd, "rb")

    # -- records --------------------------------------------------------------
    def write_outcome(self, job_id: str, record: OutcomeRecord) -> None:
        atomic_write(self.outcome_path(job_id), json.dumps(record.to_dict(), indent=2).encode())

    def read_outcome(self, job_id: str) -> OutcomeRecord | None:
        try:
            data = json.loads(self.outcome_path(job_id).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn file cannot exist (atomic rename); treat junk as absent
        return OutcomeRecord.from_dict(data)

    def mark_cancelled(self, job_id: str) -> None:
        atomic_write(self.cancel_path(job_id), f"{time.time()}\n".encode())

    def is_cancelled(self, job_id: str) -> bool:
        return self.cancel_path(job_id).exists()

    def record_attempt(self, job_id: str, worker: str) -> int:
        """Append one line for a new attempt and return the attempt number (1, 2, ...).

        Only the worker holding the job's run lock calls this, so counting lines is safe.
        """
        path = self.attempts_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"worker": worker, "at": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return self.attempts(job_id)

    def ended_attempts_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "attempts.ended"

    def record_attempt_end(self, job_id: str, attempt: int) -> None:
        """Note that ``attempt`` was put back on purpose, so it is not counted as lost."""
        with open(self.ended_attempts_path(job_id), "a", encoding="utf-8") as handle:
            handle.write(f"{attempt}\n")
            handle.flush()
            os.fsync(handle.fileno())

    def lost_attempts(self, job_id: str) -> int:
        """Attempts started that neither recorded an outcome nor were put back on purpose."""
        try:
            with open(self.ended_attempts_path(job_id), encoding="utf-8") as handle:
                ended = {line.strip() for line in handle if line.strip()}
        except FileNotFoundError:
            ended = set()
        return max(0, self.attempts(job_id) - len(ended))

    def attempts(self, job_id: str) -> int:
        try:
            with open(self.attempts_path(job_id), encoding="utf-8") as handle:
                return sum(1 for line in handle if line.strip())
        except FileNotFoundError:
            return 0


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def regular_files(folder: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(relative posix path, open file) of every regular file under ``folder``, sorted.

    Written by jobs, these folders may hold symlinks, FIFOs or devices: nothing is
    followed (``O_NOFOLLOW``, no symlinked folders), only regular files are yielded,
    and a ``folder`` that is itself a symlink yields nothing.
    """
    if folder.is_symlink() or folder.parent.is_symlink() or not folder.is_dir():
        return
    for current, dirs, names in os.walk(folder, followlinks=False):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
        for name in sorted(names):
            path = here / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as handle:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    yield path.relative_to(folder).as_posix(), handle
