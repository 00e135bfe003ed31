"""Where bundles and results live: a small blob store, on the shared volume or in S3.

A blob is one whole file under a key such as ``bundles/ab/<sha256>.zip`` or
``jobs/<id>/results/plot.png`` (the names of the volume's layout, shared/storage.py).
:class:`BlobStore` is the interface both stores keep, checked by one set of contract
tests (tests/unit/test_blobstore_contract.py): ``put`` a file or a stream atomically
(readers see the old blob or the new one), returning the sha256 of what was stored and
refusing a blob that does not match the sha256 the caller expects; ``open`` as a
:class:`Blob` read in chunks, never whole; ``info``, ``exists``, ``has_any``, ``list``
(sorted, under a folder-like prefix) and ``delete``. :class:`VolumeBlobStore` keeps the
files under the data dir exactly where they always were, and never follows a symbolic
link a job could have planted; the S3 store is in shared/s3store.py. ``LABQ_STORAGE``
picks one (:func:`open_blobstore`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from labq.shared.errors import ConfigError, LabqError, NotFoundError

CHUNK = 1024 * 1024
STORAGE_KINDS = ("volume", "s3")


class BlobIntegrityError(LabqError):
    """What was stored does not have the sha256 the caller said it has."""

    code = "blob_integrity"
    status = 500


class BlobKeyError(LabqError):
    """A name this store cannot hold (S3: control characters, more than 1024 bytes)."""

    code = "bad_blob_key"
    status = 400


class StorageUnavailableError(LabqError):
    """The object store did not answer, or refused labq (the message says which)."""

    code = "storage_unavailable"
    status = 503


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    #: The sha256 recorded when the blob was stored, if the store keeps one (S3 metadata
    #: written by labq); None: not recorded, hash the content (:func:`content_sha256`).
    sha256: str | None = None


class Blob(io.RawIOBase):
    """An open blob: a read-only stream of ``info.size`` bytes; read it in chunks."""

    def __init__(self, info: BlobInfo, stream: IO[bytes] | Any) -> None:
        super().__init__()
        self.info = info
        self._stream = stream

    @property
    def size(self) -> int:
        return self.info.size

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._stream.read() if size is None or size < 0 else self._stream.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        # A file on the volume can be sent with sendfile(2); an S3 body has no descriptor.
        try:
            return self._stream.fileno()
        except (AttributeError, OSError) as exc:
            raise io.UnsupportedOperation("this blob has no file descriptor") from exc

    def seekable(self) -> bool:
        # Servers that send a file by descriptor seek it to where they stopped.
        try:
            return bool(self._stream.seekable())
        except (AttributeError, OSError):
            return False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if not self.seekable():
            raise io.UnsupportedOperation("this blob is read front to back only")
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        if not self.seekable():
            raise io.UnsupportedOperation("this blob is read front to back only")
        return self._stream.tell()

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        while chunk := self.read(size):
            yield chunk

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()


class HashingReader:
    """Wraps a stream: hashes and counts what is read through it."""

    def __init__(self, stream: IO[bytes] | Any) -> None:
        self._stream = stream
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


def check_key(key: str) -> list[str]:
    """The parts of a clean relative key; NotFoundError for anything else (a key can come
    from a URL: ``..``, empty parts, backslashes and NULs never name a blob)."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if (key.startswith("/") or "\\" in key or "\x00" in key
            or any(p in ("", ".", "..") for p in parts)):
        raise NotFoundError(f"there is no stored file {key!r}")
    return parts


def check_prefix(prefix: str) -> list[str]:
    """A folder-like prefix: ``""`` (everything) or a clean key ending with ``/``."""
    if prefix == "":
        return []
    if not prefix.endswith("/"):
        raise ValueError(f"a blob prefix names a folder and ends with '/', not {prefix!r}")
    return check_key(prefix[:-1])


def expect_sha256(key: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise BlobIntegrityError(
            f"{key} was not stored: its content has sha256 {actual[:12]}, not the "
            f"{expected[:12]} it was sent with; send it again")


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file, read in chunks."""
    with open(path, "rb") as handle:
        reader = HashingReader(handle)
        while reader.read(CHUNK):
            pass
    return reader.sha256, reader.size


def content_sha256(store: BlobStore, key: str, out: IO[bytes] | None = None) -> str | None:
    """The sha256 of a blob's content, read through in chunks (None when there is no
    such blob); with ``out``, the content is copied there on the way."""
    blob = store.open(key)
    if blob is None:
        return None
    digest = hashlib.sha256()
    with blob:
        for chunk in blob.chunks():
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
    return digest.hexdigest()


class BlobStore(ABC):
    """The contract; see the module docstring."""

    kind = ""

    @abstractmethod
    def put(self, key: str, source: Path | BinaryIO, *, sha256: str | None = None,
            move: bool = False) -> BlobInfo:
        """Store ``source`` (a file, or a stream read to its end) under ``key``.

        ``sha256``: what the caller knows the content to be; a mismatch raises
        :class:`BlobIntegrityError` and leaves the key as it was. ``move``: ``source`` is
        a file the store may take (it is gone afterwards); given with ``sha256`` (a hash
        labq itself just took, as of a staged upload) the file is not read again to
        check it: the volume renames it into place.
        """

    @abstractmethod
    def open(self, key: str) -> Blob | None:
        """The blob as a stream, or None when there is none."""

    @abstractmethod
    def info(self, key: str) -> BlobInfo | None:
        ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix`` (``""`` or ending in ``/``), by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; nothing happens when there is none."""

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def has_any(self, prefix: str) -> bool:
        return next(iter(self.list(prefix)), None) is not None

    def check(self) -> None:  # noqa: B027 - most stores have nothing to check
        """Raise (saying what to fix) when the store cannot be used."""

    def describe(self) -> str:
        return self.kind


class VolumeBlobStore(BlobStore):
    """Blobs as files under ``root``: ``key`` is their path relative to it.

    Jobs may have written into parts of the tree (their results), so reading never
    follows a symbolic link at any level and only regular files are blobs.
    """

    kind = "volume"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"the volume at {self.root}"

    def path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key))

    def put(self, key: str, source: Path | BinaryIO, *, sha256: str | None = None,
            move: bool = False) -> BlobInfo:
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if move and isinstance(source, Path):
            size = source.stat().st_size
            try:
                os.replace(source, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
            else:
                return BlobInfo(key, size, sha256)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
        try:
            with os.fdopen(fd, "wb") as out, contextlib.ExitStack() as stack:
                reader = HashingReader(stack.enter_context(open(source, "rb"))
                                       if isinstance(source, Path) else source)
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            expect_sha256(key, sha256, reader.sha256)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if move and isinstance(source, Path):
            source.unlink(missing_ok=True)
        return BlobInfo(key, reader.size, reader.sha256)

    def _open_dir(self, parts: list[str]) -> int | None:
        """A descriptor of root/parts, each part opened without following a link."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return None
        for part in parts:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:  # missing, a symlink (ELOOP) or not a folder
                os.close(fd)
                return None
            os.close(fd)
            fd = child
        return fd

    def _open_file(self, key: str) -> tuple[int, os.stat_result] | None:
        parts = check_key(key)
        folder = self._open_dir(parts[:-1])
        if folder is None:
            return None
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder)
        except OSError:
            return None
        finally:
            os.close(folder)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st

    def open(self, key: str) -> Blob | None:
        opened = self._open_file(key)
        if opened is None:
            return None
        fd, st = opened
        return Blob(BlobInfo(key, st.st_size), os.fdopen(fd, "rb"))

    def info(self, key: str) -> BlobInfo | None:
        opened = self._open_file(key)
        if opened is None:
            return None
        os.close(opened[0])
        return BlobInfo(key, opened[1].st_size)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        return iter(sorted(self._walk(prefix), key=lambda b: b.key))

    def has_any(self, prefix: str) -> bool:
        walk = self._walk(prefix)
        try:
            return next(walk, None) is not None
        finally:
            walk.close()  # closes the folders it holds open now, not at garbage collection

    def _walk(self, prefix: str) -> Iterator[BlobInfo]:
        top = self._open_dir(check_prefix(prefix))
        if top is None:
            return
        try:
            for current, _dirs, names, dir_fd in os.fwalk(".", dir_fd=top,
                                                         follow_symlinks=False):
                here = "" if current == "." else current[2:] + "/"
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        yield BlobInfo(f"{prefix}{here}{name}", st.st_size)
        finally:
            os.close(top)

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            pass  # a folder is no blob


def open_blobstore(settings: Any) -> BlobStore:
    """The store ``LABQ_STORAGE`` names: ``volume`` (the data dir) or ``s3``."""
    kind = (settings.storage or "volume").strip().lower()
    if kind == "volume":
        return VolumeBlobStore(Path(settings.data_dir).resolve())
    if kind == "s3":
        from labq.shared.s3store import S3BlobStore

        return S3BlobStore.from_settings(settings)
    raise ConfigError(f"LABQ_STORAGE={settings.storage!r} is not a storage labq knows; "
                      f"use one of {', '.join(STORAGE_KINDS)}")
