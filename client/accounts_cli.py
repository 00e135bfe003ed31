"""``labq user ...`` (admins, on the server: talks to the configured database directly) and
``labq login / logout / whoami / token ...`` (anyone, over HTTP with their token)."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import click

from labq.client import credentials
from labq.client.api import Client
from labq.client.cli import CliError, _call, _client, _settings, main


def _engine() -> Any:
    settings = _settings()
    from labq.shared.db import make_engine

    url = settings.resolved_database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        # A mistyped LABQ_DATA_DIR must not quietly get a fresh, empty user table.
        raise CliError(f"there is no labq database at {url.removeprefix('sqlite:///')}; "
                       "run this where labq runs (same LABQ_DATA_DIR or LABQ_DATABASE_URL), "
                       "or start labq once first")
    return make_engine(settings)


def _accounts() -> Any:
    from labq.backend import accounts

    return accounts


def _tokens_changed() -> None:
    """The backend processes on this host forget the token owners they remember
    (backend/tokenmemo.py): the change applies at their next request."""
    from labq.backend.tokenmemo import note_change

    note_change(_settings().data_dir)


def _account_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from labq.shared.errors import LabqError

    try:
        return fn(*args, **kwargs)
    except LabqError as exc:
        raise CliError(exc.message) from exc


def _read_secret(prompt: str, confirm: bool) -> str:
    """A password from stdin when it is not a terminal (scripts), else a hidden prompt."""
    if not sys.stdin.isatty():
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise CliError("no password on stdin")
        return line
    return click.prompt(prompt, hide_input=True, confirmation_prompt=confirm)


# -- labq user (server side) ------------------------------------------------------------


@main.group()
def user() -> None:
    """Manage accounts (on the server: uses LABQ_DATABASE_URL / LABQ_DATA_DIR)."""


@user.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin sees and steers every job.")
def user_add(name: str, admin: bool) -> None:
    """Create a user; prints their first API token as the last line."""
    engine = _engine()
    acc = _accounts()
    row = _account_call(acc.create_user, engine, name, admin=admin)
    _token_id, token = acc.create_token(engine, row["id"], "labq user add")
    click.echo(f"user {name} created{' (admin)' if admin else ''}; give them this API token "
               f"(LABQ_TOKEN) and set a password for the web pages with "
               f"`labq user passwd {name}`:", err=True)
    click.echo(token)


@user.command("passwd")
@click.argument("name")
def user_passwd(name: str) -> None:
    """Set a user's password (from stdin, or asked twice); signs out their sessions."""
    engine = _engine()
    password = _read_secret(f"New password for {name}", confirm=True)
    _account_call(_accounts().set_password, engine, name, password)
    click.echo(f"password of {name} changed")


@user.command("list")
def user_list() -> None:
    """Every user: admin or not, disabled or not, live tokens."""
    from datetime import UTC, datetime

    rows = [("NAME", "ADMIN", "DISABLED", "TOKENS", "CREATED")]
    for row in _accounts().list_users(_engine()):
        created = datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M")
        rows.append((row["name"], "yes" if row["is_admin"] else "no",
                     "yes" if row["disabled"] else "no", str(row["tokens"]), created))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@user.command("disable")
@click.argument("name")
def user_disable(name: str) -> None:
    """Lock a user out: their tokens and sessions stop working at once."""
    _account_call(_accounts().set_disabled, _engine(), name, True)
    _tokens_changed()
    click.echo(f"user {name} disabled")


@user.command("enable")
@click.argument("name")
def user_enable(name: str) -> None:
    """Let a disabled user in again."""
    _account_call(_accounts().set_disabled, _engine(), name, False)
    _tokens_changed()
    click.echo(f"user {name} enabled")


# -- signing in (any researcher, over HTTP) ---------------------------------------------------


@main.command()
@click.option("--user", "-u", "name", help="Your labq user name (asked when missing).")
@click.pass_context
def login(ctx: click.Context, name: str | None) -> None:
    """Sign in with your password; saves a new API token for later commands."""
    url = ctx.find_root().obj["url"]
    if not name:
        name = click.prompt("User") if sys.stdin.isatty() else sys.stdin.readline().strip()
    password = getpass.getpass("Password: ") if sys.stdin.isatty() \
        else sys.stdin.readline().rstrip("\r\n")
    client = Client(url, token="-")  # never send a stored token along with the password
    created = _call(client.login, name, password)
    path = credentials.save_token(created["token"], url)
    click.echo(f"signed in to {url} as {name}; token saved in {path}")


@main.command()
@click.pass_context
def logout(ctx: click.Context) -> None:
    """Revoke the token `labq login` saved, and forget it."""
    url = ctx.find_root().obj["url"]
    token = credentials.saved_token(url)
    if not token:
        raise CliError(f"not signed in to {url} (no token for it in "
                       f"{credentials.saved_tokens_path()})")
    client = Client(url, token=token)
    try:
        me = client.me()
        if me.get("token_id") is not None:
            client.revoke_token(me["token_id"])
    except Exception as exc:  # noqa: BLE001 - the token is forgotten either way
        click.echo(f"labq: could not revoke the token on the server ({exc}); "
                   "forgetting it here anyway", err=True)
    credentials.forget_token(url)
    click.echo("signed out")


@main.command()
@click.pass_context
def whoami(ctx: click.Context) -> None:
    """Who the CLI is signed in as, and where its token comes from."""
    client = _client(ctx)
    me = _call(client.me)
    click.echo(f"{me['name']}{' (admin)' if me.get('admin') else ''} on {client.url} "
               f"(token from {client.token_source})")


@main.group()
def token() -> None:
    """Your API tokens (for scripts, other machines, LABQ_TOKEN)."""


@token.command("create")
@click.argument("name", required=False, default="token")
@click.pass_context
def token_create(ctx: click.Context, name: str) -> None:
    """Make a new API token; prints it as the last line (shown only once)."""
    created = _call(_client(ctx).create_token, name)
    click.echo(f"token {created['id']} ({created['name']}) for {created['user']}; "
               "keep it secret, it is shown only once:", err=True)
    click.echo(created["token"])


@token.command("list")
@click.pass_context
def token_list(ctx: click.Context) -> None:
    """Your live tokens (never the tokens themselves: labq keeps only their hashes)."""
    for t in _call(_client(ctx).tokens):
        click.echo(f"{t['id']:>5}  {t['name']:<30}  created {t['created_at'][:19]}  "
                   f"last used {(t['last_used_at'] or '-')[:19]}")


@token.command("revoke")
@click.argument("token_id", type=int)
@click.pass_context
def token_revoke(ctx: click.Context, token_id: int) -> None:
    """Revoke one of your tokens by its id (`labq token list`)."""
    _call(_client(ctx).revoke_token, token_id)
    click.echo(f"token {token_id} revoked")
