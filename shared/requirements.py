"""What a bundle's ``requirements.txt`` may ask of the worker that builds its environment.

uv reads requirements files with pip's syntax, which can name much more than packages:
other files (``-r``/``-c`` with any path, local paths, ``file:`` URLs), the worker's own
folders in editable mode (``-e .``), and indexes or archives on the worker's loopback.
A bundle may name files *inside the bundle only* (relative paths that stay in it) and
packages from real indexes; anything else is refused at upload with a 422 that names
the line, before anything is stored or queued.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Callable, Iterable
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from labq.shared.errors import BundleError

FILE_OPTIONS = {"-r", "--requirement", "-c", "--constraint"}
EDITABLE = {"-e", "--editable"}
URL_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links"}
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s;]+|file:[^\s;]+")
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class RequirementsError(BundleError):
    """Raised when requirements.txt names something outside the bundle or the index."""

    code = "invalid_requirements"
    status = 422


def _refuse(name: str, number: int, line: str, why: str) -> RequirementsError:
    return RequirementsError(f"{name} line {number}: {line.strip()!r}: {why}",
                             field="requirements.txt", line=number)


def _local_host(host: str | None) -> bool:
    if not host:
        return True
    if host.lower() in _LOCAL_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_loopback or address.is_link_local or address.is_unspecified


def _check_url(url: str) -> str | None:
    """Why ``url`` is refused, or None."""
    if url.lower().startswith("file:"):
        return "file: URLs would read the worker's own files; put the file in the bundle"
    if _local_host(urlsplit(url).hostname):
        return "URLs on the worker's own machine (localhost, 127.0.0.1) are not allowed"
    return None


def _inside(path_text: str, here: PurePosixPath, files: set[PurePosixPath]) -> bool:
    path = PurePosixPath(path_text)
    if path.is_absolute() or path_text.startswith("~"):
        return False
    parts: list[str] = list(here.parts)
    for part in path.parts:
        if part == "..":
            if not parts:
                return False
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts) in files if parts else False


def _looks_like_path(token: str) -> bool:
    return token.startswith(("/", "./", "../", "~", ".\\")) or token in (".", "..")


class _Refused(Exception):
    """Raised when one requirements line reaches outside the bundle (the reason)."""


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=False)
    except ValueError:
        return line.split()


def _included_file(target: str, here: PurePosixPath,
                   known: set[PurePosixPath]) -> PurePosixPath:
    """The bundle file a ``-r``/``-c`` line names; refused if it is not in the bundle."""
    if not _inside(target, here, known):
        raise _Refused("it may only name a file inside the bundle (a relative path next "
                       "to requirements.txt)")
    return PurePosixPath(os.path.normpath(str(here / target)))


def _check_locations(line: str, option: str, value: str) -> None:
    """Refuse URLs that reach the worker's own host and index options naming folders."""
    for url in _URL.findall(line):
        why = _check_url(url)
        if why:
            raise _Refused(why)
    if option in URL_OPTIONS and value and "://" not in value:
        raise _Refused("index and find-links locations must be http(s) URLs, not folders "
                       "of the worker")


def _check_line(line: str, here: PurePosixPath,
                known: set[PurePosixPath]) -> PurePosixPath | None:
    """Raise :class:`_Refused` when ``line`` reaches outside the bundle; return the
    bundle file it includes with ``-r``/``-c``, if any."""
    tokens = _tokens(line)
    first = tokens[0]
    option, _, attached = first.partition("=")
    value = attached or (tokens[1] if len(tokens) > 1 else "")
    if option in EDITABLE or first.startswith("-e"):
        raise _Refused("editable installs (-e) are not allowed: they build whatever "
                       "folder they name on the worker")
    if option in FILE_OPTIONS or first.startswith(("-r", "-c")) and len(first) > 2:
        return _included_file(value if option in FILE_OPTIONS else first[2:], here, known)
    _check_locations(line, option, value)
    if any(_looks_like_path(token) for token in tokens) or "@ file:" in line:
        raise _Refused("local paths would install from the worker's own folders; put the "
                       "package in the bundle or use an index")
    return None


def check_requirements(text: str, files: Iterable[PurePosixPath], *,
                       here: PurePosixPath = PurePosixPath(),
                       name: str = "requirements.txt") -> list[PurePosixPath]:
    """Raise :class:`RequirementsError` for the first line that reaches outside; return
    the bundle files it includes with ``-r``/``-c`` (to be checked the same way).

    ``files`` are the bundle's files relative to the project folder; ``here`` is the
    folder of this requirements file (for ``-r other.txt`` next to it).
    """
    known = set(files)
    included: list[PurePosixPath] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            include = _check_line(line, here, known)
        except _Refused as why:
            raise _refuse(name, number, raw, str(why)) from None
        if include is not None:
            included.append(include)
    return included


def check_bundle_requirements(read: Callable[[PurePosixPath], bytes],
                              files: Iterable[PurePosixPath]) -> None:
    """Check requirements.txt and every file it includes, each once (``read`` gives a
    bundle file's bytes by its path relative to the project folder)."""
    known = set(files)
    todo = [PurePosixPath("requirements.txt")]
    seen: set[PurePosixPath] = set()
    while todo:
        path = todo.pop()
        if path in seen or path not in known:
            continue
        seen.add(path)
        text = read(path).decode("utf-8", errors="replace")
        todo += check_requirements(text, known, here=path.parent, name=str(path))
