"""labq's one zip extractor (client/safezip.py): bundles, stored results and downloads
all go through it, so every escape is refused in one place."""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from pathlib import Path

import pytest

from labq.client import safezip


def zip_of(entries: list[tuple[str, bytes, int]]) -> zipfile.ZipFile:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # a duplicate name is what one test wants
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    buf.seek(0)
    return zipfile.ZipFile(buf)


REG = stat.S_IFREG | 0o644


@pytest.mark.parametrize("name, why", [
    ("/etc/passwd", "absolute path"),
    ("C:/Windows/x", "absolute path"),
    ("a/../../x", "climbs out"),
    ("..\\x", "climbs out"),
])
def test_escaping_paths_are_refused(tmp_path: Path, name: str, why: str) -> None:
    with pytest.raises(safezip.UnsafeZipError, match=why):
        safezip.extract(zip_of([(name, b"x", REG)]), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_symlinks_clashes_and_duplicates_are_refused(tmp_path: Path) -> None:
    link = zip_of([("p/link", b"/etc/shadow", stat.S_IFLNK | 0o777)])
    with pytest.raises(safezip.UnsafeZipError, match="symbolic link"):
        safezip.extract(link, tmp_path / "a")
    clash = zip_of([("p/x", b"1", REG), ("p/x/y", b"2", REG)])
    with pytest.raises(safezip.UnsafeZipError, match="both a file and a folder"):
        safezip.extract(clash, tmp_path / "b")
    twice = zip_of([("p/x", b"1", REG), ("p/x", b"2", REG)])
    with pytest.raises(safezip.UnsafeZipError, match="twice"):
        safezip.extract(twice, tmp_path / "c")


def test_a_target_reached_through_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "p").symlink_to(tmp_path)  # left there by someone else
    with pytest.raises(safezip.UnsafeZipError, match="outside"):
        safezip.extract(zip_of([("p/x", b"1", REG)]), dest)
    assert not (tmp_path / "x").exists()


def test_bytes_are_counted_as_written(tmp_path: Path) -> None:
    big = zip_of([("a", b"x" * 3000, REG), ("b", b"y" * 3000, REG)])
    with pytest.raises(safezip.ZipTooLargeError):
        safezip.extract(big, tmp_path / "out", max_bytes=5000)


def test_files_folders_and_exec_bits(tmp_path: Path) -> None:
    zf = zip_of([("p/", b"", stat.S_IFDIR | 0o755), ("p/run.sh", b"#!/bin/sh\n", REG | 0o111),
                 ("p/sub/data.txt", b"d", 0o600 | stat.S_IFREG)])
    written = safezip.extract(zf, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "p/run.sh", "p/sub/data.txt"]
    assert (tmp_path / "out/p/run.sh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out/p/sub/data.txt").stat().st_mode & 0o777 == 0o644
