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
from typing import TYPE_CHECKING, Any

import click

from labq.client.api import TERMINAL_STATES, Client, ClientError
from labq.client.bundles import safe_extract

if TYPE_CHECKING:
    from labq.shared.settings import Settings

OUTCOMES = ["succeeded", "error", "timeout", "cancelled", "failed"]
STATE_FILTERS = ["created", "queued", "initialized", "started", "paused", "completed",
                 "stopped", "failed"]
_BIG_UPLOAD_BYTES = 5 * 1024 * 1024


class CliError(click.ClickException):
    """One readable line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"labq: {self.format_message()}", err=True)


def _settings() -> Settings:
    """The server's settings; only the service commands need them (and the server install)."""
    _require_server()
    from labq.shared.errors import ConfigError
    from labq.shared.settings import Settings

    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise CliError(exc.message) from exc


def _require_server() -> None:
    """Service commands need the server parts, which the client-only install leaves out."""
    try:
        import pika  # noqa: F401

        import labq.shared  # noqa: F401
    except ImportError as exc:
        raise CliError(
            "this command runs labq's services and needs the full package (pip install labq, "
            "or `make run` in a clone); this is the client-only install (labq-client)") from exc


def _setup_logging(service: str) -> None:
    from labq.shared.logs import setup_logging

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
    Accounts:     labq login | labq whoami | labq token create|list|revoke | labq logout
    Admins:       labq up   (or: labq backend, labq worker)
                  labq user add|passwd|list|disable|enable NAME
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
    if exc.status == 401:
        return (f"{message} — sign in with `labq login` (or set LABQ_TOKEN to an API token; "
                "on the labq server itself the admin token in $LABQ_DATA_DIR/admin-token "
                "is used when readable)")
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
    _require_server()
    from labq.backend.server import run

    sys.exit(run(_settings()))


@main.command()
def worker() -> None:
    """Run one worker: take one job at a time from RabbitMQ and run it."""
    _require_server()
    from labq.consumer.worker import run

    sys.exit(run(_settings()))


@main.command()
@click.option("--workers", "-w", type=int, default=None,
              help="How many workers (default LABQ_WORKERS, 2).")
def up(workers: int | None) -> None:
    """Run labq on this machine: broker check, backend and workers (Ctrl-C stops)."""
    settings = _settings()
    from labq.client.up import run

    _setup_logging("up")
    sys.exit(run(settings, workers))


@main.command("broker-check")
@click.option("--no-start", is_flag=True, help="Only check; never start a local broker.")
def broker_check(no_start: bool) -> None:
    """Make sure RabbitMQ answers at LABQ_RABBITMQ_URL (starting a local one if installed)."""
    settings = _settings()
    from labq.client.broker import BrokerError, ensure_broker, mask_url

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
    if job.get("group"):
        click.echo(f"group {job['group']['id']}: {job['group']['size']} jobs "
                   f"({', '.join(i[:8] for i in job['group']['job_ids'])})")
    if not wait:
        return
    if job.get("group"):
        from labq.client.research_cli import wait_for_group

        wait_for_group(client, job, quiet)
        return
    try:
        job = _follow(client, job["id"], show_log=not quiet)
    except KeyboardInterrupt:
        _interrupted([job["id"]])
    _report_end(job, logged=not quiet)


def _interrupted(job_ids: list[str]) -> None:
    """Ctrl-C while following: the jobs go on running on the server; say so and how to
    get back to them."""
    click.echo("", err=True)
    for job_id in job_ids:
        click.echo(f"labq: stopped following; job {job_id} keeps running. Follow it again "
                   f"with `labq logs -f {job_id}`, or stop it with `labq stop {job_id}`.",
                   err=True)
    sys.exit(130)


def _report_end(job: dict[str, Any], logged: bool) -> None:
    """The last line of ``submit --wait``; exits 1 unless the job succeeded."""
    if logged and job.get("error"):
        # The log just shown carries the whole message (uv's output, a traceback):
        # its first line is enough here.
        job = {**job, "error": str(job["error"]).splitlines()[0]}
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
@click.option("--q", "q", help="Only jobs whose name contains this (any case).")
@click.option("--outcome", type=click.Choice(OUTCOMES), help="Only jobs with this outcome.")
@click.option("--since", help="Only jobs created on or after this date (2024-05-01).")
@click.option("--until", help="Only jobs created before this date.")
@click.option("--sort", type=click.Choice(["created", "-created", "duration", "-duration"]),
              help="Order (default: newest first); duration is the run time.")
@click.pass_context
def ls(ctx: click.Context, state: str | None, name: str | None, limit: int, q: str | None,
       outcome: str | None, since: str | None, until: str | None, sort: str | None) -> None:
    """List jobs, newest first (or as --sort says)."""
    client = _client(ctx)
    filters = {"q": q, "outcome": outcome, "since": since, "until": until, "sort": sort}
    jobs = _call(lambda: list(client.iter_jobs(state=state, name=name, limit=limit,
                                               **filters)))
    if not jobs:
        searched = state or name or any(filters.values())
        click.echo("no jobs" + (" match" if searched else " yet — try "
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


def _researcher_lines(job: dict[str, Any]) -> list[tuple[str, str]]:
    """Durations, peak memory and CPU time, queue place: what `labq status` adds."""
    lines: list[tuple[str, str]] = []
    d = job.get("durations") or {}
    parts = [f"{k[:-2]} {d[k]:.1f}s" for k in ("queued_s", "env_s", "run_s", "paused_s",
                                              "total_s") if d.get(k) is not None]
    if parts:
        lines.append(("durations", ", ".join(parts)))
    if job.get("peak_rss_mb") is not None:
        lines.append(("peak memory", f"{job['peak_rss_mb']:.1f} MB"))
    if job.get("cpu_s") is not None:
        lines.append(("cpu time", f"{job['cpu_s']:.1f} s"))
    if job.get("queue_position"):
        lines.append(("queue", f"#{job['queue_position']}, {job.get('waiting_reason') or ''}"))
    if job.get("estimated_start_at"):
        lines.append(("estimated start", str(job["estimated_start_at"])))
    if job.get("group_id"):
        lines.append(("group", job["group_id"]))
    return lines


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
    if job.get("worker_host"):
        lines.append(("host", job["worker_host"]))
    if job.get("requested_state"):
        lines.append(("requested", job["requested_state"]))
    if job.get("owner"):
        lines.insert(2, ("owner", job["owner"]))
    if job.get("hold_reason"):
        lines.append(("waiting", job["hold_reason"]))
    if job.get("error"):
        lines.append(("error", job["error"]))
    lines += _researcher_lines(job)
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

# Account commands register themselves on `main` (they need the helpers above).
from labq.client import accounts_cli  # noqa: E402, F401

# The researcher's commands live in their own module.
from labq.client.research_cli import COMMANDS  # noqa: E402

for _command in COMMANDS:
    main.add_command(_command)

if __name__ == "__main__":
    # `python -m labq.client.cli` runs this file as __main__, a second copy of the module;
    # the account commands registered themselves on the importable one's `main`.
    from labq.client.cli import main as _main

    _main()
