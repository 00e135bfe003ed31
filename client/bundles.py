"""What the client uploads and downloads: a project folder zipped, a results zip unpacked."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from labq.client import safezip
from labq.client.errors import ClientError

#: Folders never worth uploading: environments, caches, version control.
SKIP_DIRS = frozenset({".venv", "venv", "__pycache__", ".git", ".hg", ".svn", ".mypy_cache",
                       ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules"})
SKIP_FILES = frozenset({".DS_Store", "Thumbs.db"})


def _walk_kept(folder: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` minus what is never uploaded: skipped folders and files, symlinks."""
    for current, dirs, files in os.walk(folder):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not (here / d).is_symlink())
        kept = [name for name in sorted(files)
                if name not in SKIP_FILES and not name.endswith((".pyc", ".pyo"))
                and not (here / name).is_symlink()]
        yield here, dirs, kept


def zip_project(folder: Path | str, dest: Path | str) -> int:
    """Zip ``folder`` into ``dest`` under one top folder named like it; return file count.

    Skips virtual environments, caches and version control (``.venv``, ``__pycache__``,
    ``.git``, ...) and symbolic links (the server refuses them). Empty folders such as
    ``output/`` are kept, so the job finds them.
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ClientError(f"{folder} is not a folder")
    top = folder.name or "project"
    count = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for here, dirs, kept in _walk_kept(folder):
            rel_dir = here.relative_to(folder)
            # A folder left empty (or holding only skipped files) is kept as an entry.
            if not kept and not dirs and rel_dir != Path("."):
                zf.writestr(f"{top}/{rel_dir.as_posix()}/", b"")
            for name in kept:
                path = here / name
                zf.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
                count += 1
    if count == 0:
        raise ClientError(f"{folder} has no files to send")
    return count


@contextmanager
def bundle_file(path: Path | str) -> Iterator[Path]:
    """The zip to upload for ``path``: the zip itself, or a temporary zip of a folder."""
    path = Path(path)
    if path.is_dir():
        fd, name = tempfile.mkstemp(prefix=f"labq-{path.resolve().name}-", suffix=".zip")
        os.close(fd)
        tmp = Path(name)
        try:
            zip_project(path, tmp)
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)
    elif path.is_file():
        if not zipfile.is_zipfile(path):
            raise ClientError(f"{path} is not a zip file; give a .zip or a project folder")
        yield path
    else:
        raise ClientError(f"{path} does not exist")


def safe_extract(zip_path: Path | str, dest: Path | str) -> list[Path]:
    """Unpack a results zip into ``dest``, refusing paths that would land outside it."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return safezip.extract(zf, Path(dest))
    except safezip.UnsafeZipError as exc:
        raise ClientError(f"the results contain an unsafe entry: {exc}") from exc
    except zipfile.BadZipFile as exc:
        raise ClientError(f"the results download is not a zip ({exc}); try again") from exc
