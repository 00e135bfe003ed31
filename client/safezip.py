"""labq's one zip extractor: no member lands outside its folder, and lying headers
cannot fill the disk.

Used for bundles on the worker (``shared.bundle.extract_bundle``), for stored results
(``process_unit.results``) and for downloaded results on a researcher's machine
(``labq results``). It lives in the client package because that package installs on its
own (``pip install ./client``, standard library only here) and the server includes it.

Refused: absolute paths (also ``C:``), ``..``, symbolic links, a name that is both a
file and a folder, and any target that resolves outside the destination.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

CHUNK = 1024 * 1024
Member = tuple[zipfile.ZipInfo, PurePosixPath]


class UnsafeZipError(ValueError):
    """A member that must not be written; the message says which and why."""


class ZipTooLargeError(UnsafeZipError):
    """More bytes came out than allowed (a header may say less than the data holds)."""


def member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's relative path (None for the root folder), or UnsafeZipError."""
    raw = info.filename.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise UnsafeZipError(f"the zip contains an absolute path ({info.filename!r}); "
                             "zip the folder itself, with relative paths")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeZipError(
            f"the zip contains a path that climbs out of its folder ({info.filename!r})")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeZipError(
            f"the zip contains a symbolic link ({info.filename!r}); replace it by the real file")
    return PurePosixPath(*parts) if parts else None


def file_members(infos: Iterable[zipfile.ZipInfo]) -> list[Member]:
    """The regular files among ``infos`` with their safe paths, in zip order."""
    members: list[Member] = []
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    for info in infos:
        path = member_path(info)
        if path is None or info.is_dir():
            continue
        if path in files:
            raise UnsafeZipError(f"{info.filename!r} is in the zip twice; zip it again")
        if path in folders or any(p in files for p in path.parents):
            raise UnsafeZipError(
                f"{info.filename!r} is both a file and a folder in the zip; rename one of them")
        files.add(path)
        folders.update(path.parents)
        members.append((info, path))
    return members


def extract(zf: zipfile.ZipFile, dest: Path, members: Iterable[Member] | None = None,
            max_bytes: int = 0) -> list[Path]:
    """Write ``members`` (default: every file of ``zf``) under ``dest``; return the files.

    Counts the bytes really written: past ``max_bytes`` (0 = no limit) it raises
    :class:`ZipTooLargeError`. Executable bits survive (0o755), nothing else (0o644).
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    written: list[Path] = []
    total = 0
    for info, rel in (file_members(zf.infolist()) if members is None else members):
        target = root.joinpath(*rel.parts)
        if not target.resolve().is_relative_to(root):  # e.g. through a folder symlink
            raise UnsafeZipError(f"{info.filename!r} would be written outside {dest}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                total += len(chunk)
                if max_bytes and total > max_bytes:
                    raise ZipTooLargeError(
                        f"the zip unpacks to more than {max_bytes // CHUNK} MiB")
                out.write(chunk)
        target.chmod(0o755 if (info.external_attr >> 16) & 0o111 else 0o644)
        written.append(target)
    return written
