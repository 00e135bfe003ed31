"""Bundle validation and safe extraction.

A bundle is a zip holding one top folder ``<project-name>/`` (or the files at its
root) with ``code.py`` (or ``main_script.py``, or the ``entrypoint`` named in
``labq.toml``), an optional ``requirements.txt`` and an optional ``output/`` folder.

:func:`inspect_bundle` runs on the backend before a job is accepted and refuses,
with an error a researcher understands, anything that is not a real zip, has absolute
or ``..`` paths, symlinks, too many files, too many bytes once unpacked, a suspicious
compression ratio, or no entrypoint. :func:`extract_bundle` runs on the worker and
checks everything again while it writes, counting the bytes it really writes, because
a zip's headers can lie.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from labq.client import safezip
from labq.client.safezip import Member
from labq.shared.errors import (
    BundleError,
    BundleTooLargeError,
    ManifestError,
    MissingEntrypointError,
)
from labq.shared.manifest import MANIFEST_NAME, JobSpec, parse_manifest, resolve_spec
from labq.shared.requirements import check_bundle_requirements
from labq.shared.settings import Settings

ENTRYPOINTS = ("code.py", "main_script.py")
REQUIREMENTS = "requirements.txt"
OUTPUT_DIR = "output"
#: Files that archivers add and nobody means to send.
_JUNK = re.compile(r"(^|/)(__MACOSX(/|$)|\.DS_Store$|Thumbs\.db$)")
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BundleLimits:
    max_files: int
    max_unpacked_bytes: int
    max_ratio: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BundleLimits:
        return cls(
            settings.max_bundle_files, settings.max_unpacked_bytes, settings.max_compression_ratio
        )


@dataclass(frozen=True)
class BundleInfo:
    name: str
    #: The folder inside the zip that holds the project ("" when files are at the root).
    root: str
    entrypoint: str
    has_requirements: bool
    file_count: int
    unpacked_bytes: int
    manifest: dict[str, Any] = field(default_factory=dict)


def clean_name(raw: str) -> str:
    name = _NAME_OK.sub("-", raw).strip("-.")[:100]
    return name or "job"


def _members(zf: zipfile.ZipFile, limits: BundleLimits) -> list[Member]:
    """The bundle's files (archiver junk left out), within the limits, or BundleError."""
    try:
        members = safezip.file_members(
            i for i in zf.infolist() if not _JUNK.search(i.filename.replace("\\", "/")))
    except safezip.UnsafeZipError as exc:
        raise BundleError(str(exc)) from exc
    if len(members) > limits.max_files:
        raise BundleTooLargeError(
            f"the bundle holds more than {limits.max_files} files; "
            "leave data sets out or pack them into fewer files")
    if sum(i.file_size for i, _ in members) > limits.max_unpacked_bytes:
        raise BundleTooLargeError(
            f"the bundle unpacks to more than {limits.max_unpacked_bytes // (1024 * 1024)} MiB")
    for info, _ in members:
        if info.file_size > _CHUNK and info.file_size > limits.max_ratio * max(
                info.compress_size, 1):
            raise BundleTooLargeError(
                f"{info.filename!r} expands {info.file_size // max(info.compress_size, 1)}x "
                "when unpacked, which looks like a zip bomb")
    return members


def _find_root(paths: list[PurePosixPath]) -> str:
    """The single top folder holding everything, or "" when files sit at the zip's root."""
    tops = {p.parts[0] for p in paths}
    if len(tops) == 1 and all(len(p.parts) > 1 for p in paths):
        return next(iter(tops))
    return ""


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BundleError(
            "the upload is not a zip file; compress your project folder as .zip and try again"
        ) from exc


def inspect_bundle(
    path: Path,
    settings: Settings,
    fallback_name: str = "job",
    overrides: dict[str, Any] | None = None,
) -> tuple[BundleInfo, JobSpec]:
    """Validate the zip at ``path``; return what it holds and the resolved job spec."""
    with _open(path) as zf:
        members = _members(zf, BundleLimits.from_settings(settings))
        if not members:
            raise MissingEntrypointError("the zip is empty; put code.py in it")
        paths = {p for _, p in members}
        root = _find_root(list(paths))
        prefix = PurePosixPath(root) if root else PurePosixPath()
        manifest = _read_and_check(zf, members, prefix)
    data = {**manifest, **(overrides or {})}
    entry = _entrypoint(data.get("entrypoint"), prefix, paths, root)
    raw_name = data.get("name") if isinstance(data.get("name"), str) else None
    info = BundleInfo(
        name=clean_name(raw_name or root or fallback_name),
        root=root,
        entrypoint=entry,
        has_requirements=(prefix / REQUIREMENTS) in paths,
        file_count=len(members),
        unpacked_bytes=sum(i.file_size for i, _ in members),
        manifest=manifest,
    )
    return info, resolve_spec(data, entry, settings)


def _read_and_check(zf: zipfile.ZipFile, members: list[Member],
                    prefix: PurePosixPath) -> dict[str, Any]:
    """labq.toml (parsed), requirements.txt checked, every member's checksum tested."""
    by_path = {p: i for i, p in members}
    manifest: dict[str, Any] = {}
    try:
        info = by_path.get(prefix / MANIFEST_NAME)
        if info is not None:
            if info.file_size > 64 * 1024:
                raise ManifestError("labq.toml is larger than 64 KiB", field="labq.toml")
            manifest = parse_manifest(zf.read(info))
        check_bundle_requirements(lambda rel: zf.read(by_path[prefix / rel]),
                                  [p.relative_to(prefix) for p in by_path])
        if zf.testzip() is not None:
            raise BundleError("the zip is damaged (a file fails its checksum); zip it again")
    except RuntimeError as exc:  # zipfile's word for "encrypted"
        raise BundleError("the zip is password-protected; zip it again without a password"
                          ) from exc
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
        raise BundleError(f"the zip cannot be read ({exc}); zip it again") from exc
    return manifest


def _entrypoint(named: Any, prefix: PurePosixPath, paths: set[PurePosixPath],
                root: str) -> str:
    """The script to run: the one labq.toml names, else code.py or main_script.py."""
    if named is None:
        found = [e for e in ENTRYPOINTS if (prefix / e) in paths]
        if not found:
            where = f"{root}/" if root else "the top of the zip"
            raise MissingEntrypointError(
                f"no code.py found in {where}: put your script there as code.py "
                "(or main_script.py), or name it in labq.toml with entrypoint = \"...\"")
        return found[0]
    if not isinstance(named, str) or not named.strip():
        raise ManifestError("entrypoint must be a file name such as \"train.py\"",
                            field="entrypoint")
    ep = PurePosixPath(named)
    if ep.is_absolute() or ".." in ep.parts or (prefix / ep) not in paths:
        raise MissingEntrypointError(
            f"the entrypoint {named!r} named in labq.toml is not in the bundle"
            + (f" (looked for {root}/{named})" if root else ""),
            field="entrypoint")
    return str(ep)


def extract_bundle(path: Path, dest: Path, limits: BundleLimits) -> Path:
    """Unpack the bundle's project folder into ``dest`` (which must not exist yet).

    Returns ``dest``. Re-checks every rule of :func:`inspect_bundle` and counts the
    bytes really written, so a lying header cannot fill the disk.
    """
    dest.mkdir(parents=True)
    with _open(path) as zf:
        members = _members(zf, limits)
        root = _find_root([p for _, p in members])
        if root:
            members = [(i, PurePosixPath(*p.parts[1:])) for i, p in members]
        try:
            safezip.extract(zf, dest, members, max_bytes=limits.max_unpacked_bytes)
        except safezip.ZipTooLargeError as exc:
            raise BundleTooLargeError("the bundle unpacks to more than allowed") from exc
        except safezip.UnsafeZipError as exc:
            raise BundleError(str(exc)) from exc
    return dest


def zip_folder(folder: Path, dest: Path, max_bytes: int = 0) -> int:
    """Zip ``folder``'s content into ``dest`` (paths relative to ``folder``); return bytes.

    Symlinks are not followed, so a job cannot smuggle files from elsewhere into its
    results. Raises :class:`BundleTooLargeError` past ``max_bytes`` of input (0 = no limit).
    """
    total = 0
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        # A job may replace output/ itself by a symlink to somewhere else: take nothing.
        if folder.is_dir() and not folder.is_symlink():
            for file in sorted(folder.rglob("*")):
                if file.is_symlink() or not file.is_file():
                    continue
                total += file.stat().st_size
                if max_bytes and total > max_bytes:
                    raise BundleTooLargeError(
                        f"output/ is larger than the {max_bytes // (1024 * 1024)} MiB allowed"
                    )
                zf.write(file, file.relative_to(folder).as_posix())
    return total

