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

Bundles and results are blobs (shared/blobstore.py) under the same keys
(``bundles/ab/<sha256>.zip``, ``jobs/<id>/results.zip``, ``jobs/<id>/results/<path>``):
on this volume by default, in an S3 bucket with ``LABQ_STORAGE=s3``. Everything else
here (logs, outcome, attempts, markers, locks) stays on the volume in both cases.

Everything that readers may see is written to a temporary name and renamed into
place, so nobody ever reads half a file. The backend and the workers meet only here
(and in the bucket) and on RabbitMQ. With workers on several hosts this folder is a
network file system; what labq needs from it (one file system, atomic rename, exclusive
create, flock seen by every host, durable fsync, fresh name lookups) is listed in
docs/admin.md, "What the shared volume must provide", and shared/mounts.py warns about
mount options that break it.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from labq.shared.blobstore import (
    Blob,
    BlobInfo,
    BlobKeyError,
    BlobStore,
    StorageUnavailableError,
    VolumeBlobStore,
    check_key,
    content_sha256,
    open_blobstore,
)
from labq.shared.errors import ConfigError, LabqError, NotFoundError
from labq.shared.lru import Lru
from labq.shared.outcome import OutcomeRecord

#: How many settled jobs' "has results" answers a process remembers (object stores).
RESULTS_MEMO = 10_000
#: Result files uploaded at once to an object store.
PUT_THREADS = 8


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
    def __init__(self, data_dir: Path | str, blobs: BlobStore | None = None) -> None:
        self.root = Path(data_dir).resolve()
        self.bundles = self.root / "bundles"
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"
        #: Where bundles and results live (the volume unless LABQ_STORAGE says otherwise).
        self.blobs: BlobStore = blobs or VolumeBlobStore(self.root)
        self._has_results: Lru[str, bool] = Lru(RESULTS_MEMO)

    @classmethod
    def from_settings(cls, settings: Any) -> Storage:
        return cls(settings.data_dir, open_blobstore(settings))

    @property
    def on_volume(self) -> bool:
        """True when bundles and results are files under the data dir."""
        return isinstance(self.blobs, VolumeBlobStore) and self.blobs.root == self.root

    def ensure(self) -> Storage:
        folders = [self.root, self.jobs, self.tmp] + ([self.bundles] if self.on_volume else [])
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        # Only labq's own user may enter the data dir: even a job that runs without
        # bubblewrap (as its own uid) cannot reach the database, bundles or logs.
        with contextlib.suppress(PermissionError):
            if self.root.stat().st_uid == os.geteuid():
                os.chmod(self.root, 0o700)
        try:
            self.blobs.check()
        except StorageUnavailableError as exc:
            # At start-up a missing or unreachable bucket is a setting to fix.
            raise ConfigError(exc.message) from None
        return self

    # -- bundles --------------------------------------------------------------
    @staticmethod
    def bundle_key(sha256: str) -> str:
        if not _SHA.match(sha256 or ""):
            raise NotFoundError(f"no bundle {sha256!r}")
        return f"bundles/{sha256[:2]}/{sha256}.zip"

    def bundle_path(self, sha256: str) -> Path:
        """Where the bundle is on the volume (with ``LABQ_STORAGE=volume``)."""
        return self.root / self.bundle_key(sha256)

    def has_bundle(self, sha256: str) -> bool:
        return self.blobs.exists(self.bundle_key(sha256))

    def store_bundle(self, staged: Path, sha256: str) -> Path | None:
        """Move a staged upload to its content-addressed place; return its path on the
        volume (None when bundles live in an object store).

        A blob already there is kept only if its content still has that hash: one that
        was changed in storage is replaced by the upload (whose hash was just taken),
        so a poisoned copy can never stand in for what a researcher sends.
        """
        key = self.bundle_key(sha256)
        if content_sha256(self.blobs, key) != sha256:
            self.blobs.put(key, staged, sha256=sha256, move=True)
        return self.bundle_path(sha256) if self.on_volume else None

    def _tampered(self, sha256: str, actual: str) -> BundleTamperedError:
        where = "on the data volume" if self.on_volume else f"in {self.blobs.describe()}"
        return BundleTamperedError(
            f"the stored bundle {sha256[:12]} no longer matches its sha256 (it is "
            f"{actual[:12]}): it was changed {where}; upload the job again")

    def verify_bundle(self, sha256: str) -> Path:
        """The bundle's path on the volume once its content is checked against its name
        (the worker runs only what was uploaded); raises BundleTamperedError otherwise."""
        path = self.bundle_path(sha256)
        actual = sha256_of(path)
        if actual != sha256:
            raise self._tampered(sha256, actual)
        return path

    @contextlib.contextmanager
    def fetched_bundle(self, sha256: str, scratch: Path) -> Iterator[Path]:
        """A local copy of the bundle, checked against its sha256, for as long as the
        ``with`` lasts: the volume's own file, or one downloaded into ``scratch``."""
        if not self.has_bundle(sha256):
            raise LabqError(f"the job's bundle {sha256[:12]} is missing from "
                            f"{'the data dir' if self.on_volume else self.blobs.describe()}; "
                            "upload the job again")
        if self.on_volume:
            yield self.verify_bundle(sha256)
            return
        scratch.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=scratch, prefix=".bundle-", suffix=".zip")
        local = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = content_sha256(self.blobs, self.bundle_key(sha256), out)
            if actual != sha256:
                raise self._tampered(sha256, actual or "nothing")
            yield local
        finally:
            local.unlink(missing_ok=True)

    # -- results ----------------------------------------------------------------
    def results_key(self, job_id: str) -> str:
        self.job_dir(job_id)  # validates the id
        return f"jobs/{job_id}/results.zip"

    def results_prefix(self, job_id: str) -> str:
        self.job_dir(job_id)
        return f"jobs/{job_id}/results/"

    def result_key(self, job_id: str, path: str) -> str:
        """The key of one result file; NotFoundError for a path that is not clean."""
        check_key(path)
        return self.results_prefix(job_id) + path

    def open_results_zip(self, job_id: str) -> Blob | None:
        return self.blobs.open(self.results_key(job_id))

    def has_results_zip(self, job_id: str) -> bool:
        return self.blobs.exists(self.results_key(job_id))

    def result_files(self, job_id: str) -> list[tuple[str, BlobInfo]]:
        """(path relative to output/, blob) of every result file, sorted by path."""
        prefix = self.results_prefix(job_id)
        return [(info.key[len(prefix):], info) for info in self.blobs.list(prefix)]

    def open_result(self, job_id: str, path: str) -> Blob | None:
        return self.blobs.open(self.result_key(job_id, path))

    def has_results(self, job_id: str, settled: bool = False) -> bool:
        """True when the job left at least one result file. ``settled``: the job has
        ended, so the answer is final and, from an object store, remembered (job lists
        ask for every row)."""
        remember = settled and not self.on_volume
        if remember and (known := self._has_results.get(job_id)) is not None:
            return bool(known)
        found = self.blobs.has_any(self.results_prefix(job_id))
        if remember:
            self._has_results.put(job_id, found)
        return found

    def put_results(self, job_id: str, zip_path: Path, files: Path) -> list[str]:
        """Store a job's results from local files (object stores; the volume's worker
        swaps folders instead, process_unit/results.py): every file under ``files`` and
        then the zip, moving them; blobs of an earlier attempt are removed. Returns the
        paths kept only in the zip, because the store cannot name them."""
        prefix = self.results_prefix(job_id)
        stale = {info.key for info in self.blobs.list(prefix)}
        local = sorted(p for p in files.rglob("*") if p.is_file() and not p.is_symlink())
        skipped: list[str] = []

        def put(path: Path) -> None:
            rel = path.relative_to(files).as_posix()
            try:
                self.blobs.put(prefix + rel, path, move=True)
            except BlobKeyError:
                skipped.append(rel)

        # A few at a time: an object store answers each request after a round trip.
        with ThreadPoolExecutor(max_workers=PUT_THREADS) as pool:
            list(pool.map(put, local))
        for key in stale - {prefix + p.relative_to(files).as_posix() for p in local}:
            self.blobs.delete(key)
        self.blobs.put(self.results_key(job_id), zip_path, move=True)
        self._has_results.pop(job_id)
        return sorted(skipped)

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
