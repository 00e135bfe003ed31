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
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

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


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The member's safe relative path, None for junk, or BundleError for a bad one."""
    raw = info.filename.replace("\\", "/")
    if _JUNK.search(raw):
        return None
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise BundleError(
            f"the zip contains an absolute path ({info.filename!r}); "
            "zip the project folder itself, with relative paths"
        )
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(
            f"the zip contains a path that climbs out of the project ({info.filename!r})"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BundleError(
            f"the zip contains a symbolic link ({info.filename!r}); replace it by the real file"
        )
    if not parts:
        return None
    return PurePosixPath(*parts)


def _members(
    zf: zipfile.ZipFile, limits: BundleLimits
) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    members: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    files: set[PurePosixPath] = set()
    folders: set[PurePosixPath] = set()
    total = 0
    for info in zf.infolist():
        path = _member_path(info)
        if path is None:
            continue
        if info.is_dir():
            continue
        if path in folders or any(parent in files for parent in path.parents):
            raise BundleError(
                f"{info.filename!r} is both a file and a folder in the zip; rename one of them"
            )
        files.add(path)
        folders.update(path.parents)
        members.append((info, path))
        if len(members) > limits.max_files:
            raise BundleTooLargeError(
                f"the bundle holds more than {limits.max_files} files; "
                "leave data sets out or pack them into fewer files"
            )
        total += info.file_size
        if total > limits.max_unpacked_bytes:
            raise BundleTooLargeError(
                f"the bundle unpacks to more than {limits.max_unpacked_bytes // (1024 * 1024)} MiB"
            )
        if (
            info.file_size > _CHUNK
            and info.file_size > limits.max_ratio * max(info.compress_size, 1)
        ):
            raise BundleTooLargeError(
                f"{info.filename!r} expands {info.file_size // max(info.compress_size, 1)}x "
                "when unpacked, which looks like a zip bomb"
            )
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
    limits = BundleLimits.from_settings(settings)
    with _open(path) as zf:
        members = _members(zf, limits)
        if not members:
            raise MissingEntrypointError("the zip is empty; put code.py in it")
        paths = {p for _, p in members}
        root = _find_root(list(paths))
        prefix = PurePosixPath(root) if root else PurePosixPath()
        manifest: dict[str, Any] = {}
        manifest_path = prefix / MANIFEST_NAME
        try:
            if manifest_path in paths:
                info = next(i for i, p in members if p == manifest_path)
                if info.file_size > 64 * 1024:
                    raise ManifestError("labq.toml is larger than 64 KiB", field="labq.toml")
                manifest = parse_manifest(zf.read(info))
            check_bundle_requirements(
                lambda rel: zf.read(next(i for i, p in members if p == prefix / rel)),
                [p.relative_to(prefix) for p in paths])
            if zf.testzip() is not None:
                raise BundleError("the zip is damaged (a file fails its checksum); zip it again")
        except RuntimeError as exc:  # zipfile's word for "encrypted"
            raise BundleError(
                "the zip is password-protected; zip it again without a password"
            ) from exc
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
            raise BundleError(f"the zip cannot be read ({exc}); zip it again") from exc
    data = {**manifest, **(overrides or {})}
    entrypoint = data.get("entrypoint")
    if entrypoint is not None:
        if not isinstance(entrypoint, str) or not entrypoint.strip():
            raise ManifestError(
                "entrypoint must be a file name such as \"train.py\"", field="entrypoint"
            )
        ep = PurePosixPath(entrypoint)
        if ep.is_absolute() or ".." in ep.parts or (prefix / ep) not in paths:
            raise MissingEntrypointError(
                f"the entrypoint {entrypoint!r} named in labq.toml is not in the bundle"
                + (f" (looked for {root}/{entrypoint})" if root else ""),
                field="entrypoint",
            )
        entry = str(ep)
    else:
        found = [e for e in ENTRYPOINTS if (prefix / e) in paths]
        if not found:
            where = f"{root}/" if root else "the top of the zip"
            raise MissingEntrypointError(
                f"no code.py found in {where}: put your script there as code.py "
                "(or main_script.py), or name it in labq.toml with entrypoint = \"...\""
            )
        entry = found[0]
    raw_name = data.get("name") if isinstance(data.get("name"), str) else None
    name = clean_name(raw_name or root or fallback_name)
    spec = resolve_spec(data, entry, settings)
    info = BundleInfo(
        name=name,
        root=root,
        entrypoint=entry,
        has_requirements=(prefix / REQUIREMENTS) in paths,
        file_count=len(members),
        unpacked_bytes=sum(i.file_size for i, _ in members),
        manifest=manifest,
    )
    return info, spec


def extract_bundle(path: Path, dest: Path, limits: BundleLimits) -> Path:
    """Unpack the bundle's project folder into ``dest`` (which must not exist yet).

    Returns ``dest``. Re-checks every rule of :func:`inspect_bundle` and counts the
    bytes really written, so a lying header cannot fill the disk.
    """
    dest.mkdir(parents=True)
    written = 0
    with _open(path) as zf:
        members = _members(zf, limits)
        root = _find_root([p for _, p in members])
        for info, rel in members:
            if root:
                rel = PurePosixPath(*rel.parts[1:])
            target = dest.joinpath(*rel.parts)
            # Belt and braces: the resolved target must stay inside dest.
            if not target.resolve().is_relative_to(dest.resolve()):
                raise BundleError(f"{info.filename!r} would be written outside the project")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > limits.max_unpacked_bytes:
                        raise BundleTooLargeError("the bundle unpacks to more than allowed")
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            target.chmod(0o755 if mode & 0o111 else 0o644)
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

