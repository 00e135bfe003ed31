"""Turning a job's ``output/`` folder into its stored results.

``results.zip`` is written under a temporary name and renamed into place; the
unpacked copy ``results/`` is built in a temporary folder and swapped in, so readers
see the old results or the new ones, never half.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from labq.client import safezip
from labq.shared.bundle import zip_folder
from labq.shared.storage import Storage


def store_results(storage: Storage, job_id: str, output: Path, max_bytes: int) -> int:
    """Zip ``output`` into the job's results and unpack it next to it; return bytes."""
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
