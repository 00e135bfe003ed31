"""Where the CLI and SDK find their API token (client-only: no server imports).

In order: ``LABQ_TOKEN``; the token ``labq login`` saved for this server in the user's
config folder (``$XDG_CONFIG_HOME/labq/tokens.json``, default ``~/.config/labq``, mode
0600, one token per server URL, so a token is never sent to another server); the admin
token labq writes on its first start (``$LABQ_DATA_DIR/admin-token``, default
``./data/admin-token``) when the server is on this machine and this user can read it —
so ``make run`` then ``labq submit ...`` on the same machine works without signing in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "labq"


def saved_tokens_path() -> Path:
    return config_dir() / "tokens.json"


def admin_token_path() -> Path:
    return Path(os.environ.get("LABQ_DATA_DIR") or "data") / "admin-token"


def server_key(url: str) -> str:
    """The server a token belongs to: scheme, host and port, without a trailing slash."""
    parts = urlsplit(url.rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}{parts.path}".lower()


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def _saved() -> dict[str, str]:
    text = _read(saved_tokens_path())
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def saved_token(url: str) -> str | None:
    return _saved().get(server_key(url))


def find_token(url: str) -> tuple[str | None, str]:
    """(the token for the server at ``url``, where it came from) — (None, "") if none."""
    env = os.environ.get("LABQ_TOKEN", "").strip()
    if env:
        return env, "LABQ_TOKEN"
    token = saved_token(url)
    if token:
        return token, str(saved_tokens_path())
    if urlsplit(url).hostname in LOCAL_HOSTS:
        token = _read(admin_token_path())
        if token:
            return token, str(admin_token_path())
    return None, ""


def _write(tokens: dict[str, str]) -> Path:
    path = saved_tokens_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".tokens.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (json.dumps(tokens, indent=1) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def save_token(token: str, url: str) -> Path:
    """Save the token for the server at ``url``, readable by this user only."""
    tokens = _saved()
    tokens[server_key(url)] = token
    return _write(tokens)


def forget_token(url: str) -> bool:
    tokens = _saved()
    if tokens.pop(server_key(url), None) is None:
        return False
    _write(tokens)
    return True
