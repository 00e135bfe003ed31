"""Turning a job's ``output/`` folder into its stored results.

On the volume, ``results.zip`` is written under a temporary name and renamed into
place; the unpacked copy ``results/`` is built in a temporary folder and swapped in, so
readers see the old results or the new ones, never half. With an object store the zip
and the unpacked files are built in a local scratch folder and uploaded
(``Storage.put_results``); the job is not ``stopped`` before they all are, and nothing
shows results before then. Both unpack the zip labq made (safezip), never ``output/``
itself, so a job's links and special files never reach the stored results.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from labq.client import safezip
from labq.shared.bundle import zip_folder
from labq.shared.storage import Storage

log = logging.getLogger(__name__)


def store_results(storage: Storage, job_id: str, output: Path, max_bytes: int,
                  scratch: Path | None = None) -> int:
    """Zip ``output`` into the job's results and unpack it next to it; return bytes.

    ``scratch``: a local folder for the files on their way to an object store (default
    ``<data>/tmp``; the worker passes its host-local workspace).
    """
    if not storage.on_volume:
        return _store_in_blobs(storage, job_id, output, max_bytes, scratch or storage.tmp)
    job_dir = storage.job_dir(job_id)
    job_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=job_dir, prefix=".results-", suffix=".zip")
    os.close(fd)
    tmp_zip = Path(tmp_name)
    try:
        size = zip_folder(output, tmp_zip, max_bytes)
        os.replace(tmp_zip, storage.results_zip(job_id))
    finally:
        tmp_zip.unlink(missing_ok=True)
    unpack_results(storage.results_zip(job_id), storage.results_dir(job_id))
    return size


def unpack_results(zip_path: Path, dest: Path) -> None:
    """Unpack a results zip into ``dest`` safely (no path leaves ``dest``), atomically."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".results-"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            safezip.extract(zf, tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _store_in_blobs(storage: Storage, job_id: str, output: Path, max_bytes: int,
                    scratch: Path) -> int:
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix=".results-"))
    try:
        archive = tmp / "results.zip"
        size = zip_folder(output, archive, max_bytes)
        with zipfile.ZipFile(archive) as zf:
            safezip.extract(zf, tmp / "files")
        only_in_zip = storage.put_results(job_id, archive, tmp / "files")
        if only_in_zip:
            log.warning("job %s: %d result file(s) kept only in results.zip, as %s cannot "
                        "name them: %s", job_id, len(only_in_zip), storage.blobs.describe(),
                        ", ".join(repr(p) for p in only_in_zip[:5]))
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
