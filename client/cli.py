"""The ``labq`` command line: run the services, and talk to a server as a researcher.

Service commands (``up``, ``backend``, ``worker``, ``broker-check``) read settings from
``LABQ_*`` and call the service's ``run(settings)``; researcher commands (``submit``,
``ls``, ``status``, ``logs``, ``results``, ``pause``, ``resume``, ``stop``) speak HTTP
only, to ``--url`` or ``LABQ_URL`` (default http://127.0.0.1:8080).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from client.api import TERMINAL_STATES, Client, ClientError, safe_extract
from shared.settings import Settings

STATE_FILTERS = ["created", "queued", "initialized", "started", "paused", "completed",
                 "stopped", "failed"]
_BIG_UPLOAD_BYTES = 5 * 1024 * 1024


class CliError(click.ClickException):
    """One readable line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"labq: {self.format_message()}", err=True)


def _settings() -> Settings:
    from shared.errors import ConfigError

    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise CliError(exc.message) from exc


def _setup_logging(service: str) -> None:
    from shared.logs import setup_logging

    setup_logging(service)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar="LABQ_URL", default="http://127.0.0.1:8080", show_default=True,
              help="The labq server (or set LABQ_URL).")
@click.pass_context
def main(ctx: click.Context, url: str) -> None:
    """labq: a job server for research labs.

    \b
    Researchers:  labq submit examples/hello --wait
                  labq ls | labq status ID | labq logs -f ID | labq results ID
                  labq pause|resume|stop ID
    Admins:       labq up   (or: labq backend, labq worker)
    """
    ctx.obj = {"url": url}


def _client(ctx: click.Context) -> Client:
    return Client(ctx.find_root().obj["url"])


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        raise CliError(_explain(exc)) from exc


def _stream(chunks: Iterator[str]) -> None:
    """Echo a live log, turning a failure mid-stream into one readable line too."""
    try:
        for chunk in chunks:
            click.echo(chunk, nl=False)
    except ClientError as exc:
        raise CliError(_explain(exc)) from exc


def _explain(exc: ClientError) -> str:
    message = exc.message
    if exc.status == 404 and exc.code in (None, "not_found"):
        return f"{message} (see `labq ls` for your jobs)"
    allowed = exc.details.get("allowed")
    if exc.code == "invalid_transition" and allowed:
        return f"{message} (allowed now: {', '.join(allowed) or 'nothing'})"
    return message


# -- services ----------------------------------------------------------------------


@main.command()
def backend() -> None:
    """Run the REST API and web pages (gunicorn) on LABQ_HOST:LABQ_PORT."""
    from backend.server import run

    sys.exit(run(_settings()))


@main.command()
def worker() -> None:
    """Run one worker: take one job at a time from RabbitMQ and run it."""
    from consumer.worker import run

    sys.exit(run(_settings()))


@main.command()
@click.option("--workers", "-w", type=int, default=None,
              help="How many workers (default LABQ_WORKERS, 2).")
def up(workers: int | None) -> None:
    """Run labq on this machine: broker check, backend and workers (Ctrl-C stops)."""
    from client.up import run

    settings = _settings()
    _setup_logging("up")
    sys.exit(run(settings, workers))


@main.command("broker-check")
@click.option("--no-start", is_flag=True, help="Only check; never start a local broker.")
def broker_check(no_start: bool) -> None:
    """Make sure RabbitMQ answers at LABQ_RABBITMQ_URL (starting a local one if installed)."""
    from client.broker import BrokerError, ensure_broker, mask_url

    settings = _settings()
    _setup_logging("broker-check")
    try:
        started = ensure_broker(settings.rabbitmq_url, start=not no_start)
    except BrokerError as exc:
        click.echo(f"labq: {exc}", err=True)
        sys.exit(1)
    click.echo(f"RabbitMQ {'started' if started else 'is reachable'} at "
               f"{mask_url(settings.rabbitmq_url)}")


# -- researchers ---------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Progress:
    """Upload progress on stderr for large bundles (only on a terminal)."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, sent: int, total: int) -> None:
        if not self.enabled or total < _BIG_UPLOAD_BYTES:
            return
        now = time.monotonic()
        if now - self.last < 0.2 and sent < total:
            return
        self.last = now
        pct = 100 * sent // max(total, 1)
        click.echo(f"\ruploading {_fmt_bytes(sent)} / {_fmt_bytes(total)} ({pct}%)",
                   err=True, nl=False)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            click.echo("", err=True)


def _describe_end(job: dict[str, Any]) -> str:
    outcome = job.get("outcome") or job.get("state")
    parts = [f"job {job['id']} {job.get('state')}: {outcome}"]
    if job.get("exit_code") is not None:
        parts.append(f"exit code {job['exit_code']}")
    if job.get("error"):
        parts.append(str(job["error"]))
    return ", ".join(parts)


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--wait", is_flag=True,
              help="Follow the job (live log) and exit 0 only if it succeeded.")
@click.option("--name", help="Job name (default: the project folder's name).")
@click.option("--timeout-s", type=int, help="Wall-clock limit in seconds (overrides labq.toml).")
@click.option("--memory-mb", type=int, help="Memory limit in MiB (overrides labq.toml).")
@click.option("--cpus", type=int, help="CPUs the job may use (overrides labq.toml).")
@click.option("--quiet", "-q", is_flag=True, help="With --wait: do not print the log.")
@click.pass_context
def submit(ctx: click.Context, path: Path, wait: bool, name: str | None,
           timeout_s: int | None, memory_mb: int | None, cpus: int | None,
           quiet: bool) -> None:
    """Upload PATH (a .zip, or a project folder which is zipped for you) as a new job."""
    client = _client(ctx)
    fields = {"name": name, "timeout_s": timeout_s, "memory_mb": memory_mb, "cpus": cpus}
    progress = _Progress()
    try:
        job = _call(client.submit, path, fields=fields, progress=progress)
    finally:
        progress.done()
    click.echo(f"{job['id']} {job.get('state')} ({job.get('name')})")
    if not wait:
        return
    job = _follow(client, job["id"], show_log=not quiet)
    if job.get("outcome") == "succeeded":
        click.echo(_describe_end(job), err=True)
        return
    click.echo(f"labq: {_describe_end(job)}", err=True)
    sys.exit(1)


def _follow(client: Client, job_id: str, show_log: bool = True) -> dict[str, Any]:
    """Print the live log (if asked) until the job ends; return the final job."""
    if show_log:
        _stream(client.follow_log(job_id))
    return _call(client.wait, job_id)


@main.command("ls")
@click.option("--state", type=click.Choice(STATE_FILTERS), help="Only jobs in this state.")
@click.option("--name", help="Only jobs with this name.")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.pass_context
def ls(ctx: click.Context, state: str | None, name: str | None, limit: int) -> None:
    """List jobs, newest first."""
    client = _client(ctx)
    jobs = _call(lambda: list(client.iter_jobs(state=state, name=name, limit=limit)))
    if not jobs:
        click.echo("no jobs" + (" match" if state or name else " yet — try "
                                "`labq submit examples/hello`"))
        return
    rows = [("ID", "NAME", "STATE", "OUTCOME", "EXIT", "CREATED")]
    for job in jobs:
        exit_code = job.get("exit_code")
        rows.append((job["id"], str(job.get("name") or ""), str(job.get("state") or ""),
                     str(job.get("outcome") or "-"),
                     "-" if exit_code is None else str(exit_code),
                     _short_time(job.get("created_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                   .rstrip())


def _short_time(value: Any) -> str:
    if not value:
        return "-"
    text = str(value).replace("T", " ")
    return text[:19]


def _timestamps(job: dict[str, Any]) -> list[tuple[str, str]]:
    stamps: list[tuple[str, str]] = []
    nested = job.get("timestamps")
    if isinstance(nested, dict):
        stamps += [(str(k), str(v)) for k, v in nested.items() if v]
    stamps += [(k, str(v)) for k, v in job.items()
               if k.endswith("_at") and v and k not in dict(stamps)]
    return stamps


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show one job: state, outcome, exit code, attempts, error, timestamps."""
    job = _call(_client(ctx).job, job_id)
    if as_json:
        import json

        click.echo(json.dumps(job, indent=2, sort_keys=True))
        return
    lines = [("id", job.get("id")), ("name", job.get("name") or "-"), ("state", job.get("state")),
             ("outcome", job.get("outcome") or "-"),
             ("exit code", "-" if job.get("exit_code") is None else job.get("exit_code")),
             ("attempts", job.get("attempts", 0)), ("worker", job.get("worker") or "-")]
    if job.get("requested_state"):
        lines.append(("requested", job["requested_state"]))
    if job.get("error"):
        lines.append(("error", job["error"]))
    lines += _timestamps(job)
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key + ':':<{width + 1}} {value}")


@main.command()
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.pass_context
def logs(ctx: click.Context, job_id: str, follow: bool) -> None:
    """Print a job's log (stdout and stderr of every attempt)."""
    client = _client(ctx)
    if follow:
        _stream(client.follow_log(job_id))
        return
    text, _size = _call(client.log, job_id)
    click.echo(text, nl=False)


@main.command()
@click.argument("job_id")
@click.option("--output", "-o", "out_dir", type=click.Path(path_type=Path),
              help="Folder to unpack into (default ./<name>-<id8>-results).")
@click.option("--zip", "keep_zip", is_flag=True, help="Save the zip itself instead.")
@click.pass_context
def results(ctx: click.Context, job_id: str, out_dir: Path | None, keep_zip: bool) -> None:
    """Download a finished job's output/ and unpack it."""
    client = _client(ctx)
    job = _call(client.job, job_id)
    if job.get("state") not in TERMINAL_STATES:
        raise CliError(f"job {job_id} is still {job.get('state')}; results come when it "
                       f"ends (`labq logs -f {job_id}` to follow it)")
    default = f"{job.get('name') or 'job'}-{job['id'][:8]}-results"
    if keep_zip:
        dest = out_dir or Path(f"{default}.zip")
        _call(client.download_results, job_id, dest)
        click.echo(f"saved {dest}")
        return
    dest_dir = out_dir or Path(default)
    fd, name = tempfile.mkstemp(prefix="labq-results-", suffix=".zip")
    os.close(fd)
    tmp = Path(name)
    try:
        _call(client.download_results, job_id, tmp)
        files = _call(safe_extract, tmp, dest_dir)
    finally:
        tmp.unlink(missing_ok=True)
    click.echo(f"{len(files)} file{'s' if len(files) != 1 else ''} in {dest_dir}/")


def _state_command(target: str, verb: str, help_text: str) -> None:
    @main.command(verb, help=help_text)
    @click.argument("job_id")
    @click.pass_context
    def command(ctx: click.Context, job_id: str) -> None:
        job = _call(_client(ctx).set_state, job_id, target)
        state = job.get("state")
        pending = job.get("requested_state")
        suffix = f" (→ {pending} requested)" if pending and pending != state else ""
        click.echo(f"{job.get('id', job_id)} {state}{suffix}")


_state_command("paused", "pause", "Pause a running job (its whole process tree is frozen).")
_state_command("started", "resume", "Resume a paused job.")
_state_command("stopped", "stop", "Stop a job: it never runs, or is killed if running.")


if __name__ == "__main__":
    main()
