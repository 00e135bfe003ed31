"""The researcher's commands: ``labq receipt``, ``labq rerun``, ``labq group``, and the
group-aware end of ``labq submit --wait``. cli.py adds :data:`COMMANDS` to ``main``."""

from __future__ import annotations

import json
from typing import Any

import click

from labq.client.api import Client


def _cli() -> Any:
    # Imported when a command runs: cli.py registers these commands at its end, so a
    # top-level import would be circular.
    from labq.client import cli

    return cli


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not NAME=value", param_hint=what)
        out[key] = value
    return out


def wait_for_group(client: Client, job: dict[str, Any], quiet: bool) -> None:
    """``submit --wait`` of a sweep: follow the members in turn, then sum up."""
    group = job["group"]
    click.echo(f"group {group['id']}: {group['size']} jobs", err=True)
    try:
        if not quiet:
            for job_id in group["job_ids"]:
                click.echo(f"--- {job_id[:8]}", err=True)
                _cli()._follow(client, job_id, show_log=True)
        final = _cli()._call(client.wait_group, group["id"])
    except KeyboardInterrupt:
        _cli()._interrupted(group["job_ids"])
    failed = [j for j in final["jobs"] if j.get("outcome") != "succeeded"]
    for member in final["jobs"]:
        click.echo(f"{member['id'][:8]}  {member.get('outcome') or member.get('state'):<9}  "
                   f"{member.get('name')}", err=True)
    if failed:
        _cli()._report_end(failed[0], logged=not quiet)
    click.echo(f"group {group['id']}: all {group['size']} jobs succeeded", err=True)


def _receipt_lines(data: dict[str, Any], env: dict[str, Any]) -> list[tuple[str, str]]:
    """The receipt's headline fields, as (label, text) for ``labq receipt``."""
    def joined(mapping: dict[str, Any] | None, sep: str = " ") -> str:
        return sep.join(f"{k}={v}" for k, v in (mapping or {}).items())

    return [
        ("job", data["job_id"]), ("bundle sha256", data["bundle_sha256"]),
        ("command", " ".join([data.get("entrypoint") or "", *data.get("args", [])])),
        ("env", joined(data.get("env")) or "-"),
        ("python", env.get("python") or "-"), ("labq", data.get("labq_version") or "-"),
        ("worker", f"{data.get('worker') or '-'} on {data.get('worker_host') or '-'}"),
        ("limits", joined(data.get("limits"), ", ")),
        ("outcome", f"{data.get('outcome') or data.get('state')} "
                    f"(exit code {data.get('exit_code')})"),
    ]


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the receipt as JSON.")
@click.pass_context
def receipt(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """What exactly ran: bundle hash, arguments, packages, versions, result hashes."""
    data = _cli()._call(_cli()._client(ctx).receipt, job_id)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    env = data.get("environment") or {}
    lines = _receipt_lines(data, env)
    for key, value in lines:
        click.echo(f"{key + ':':<15} {value}")
    click.echo("packages:")
    for package in env.get("packages") or ["(none recorded)"]:
        click.echo(f"  {package}")
    click.echo("results:")
    for item in data.get("results") or []:
        click.echo(f"  {item['sha256']}  {item['path']}")


@click.command()
@click.argument("job_id")
@click.option("--arg", "args", multiple=True,
              help="An argument for the script (repeat for several); replaces all of them.")
@click.option("--env", "env", multiple=True, help="NAME=value (repeat); replaces [env].")
@click.option("--timeout-s", type=int)
@click.option("--memory-mb", type=int)
@click.option("--cpus", type=int)
@click.option("--wait", is_flag=True, help="Follow the new job until it ends.")
@click.pass_context
def rerun(ctx: click.Context, job_id: str, args: tuple[str, ...], env: tuple[str, ...],
          timeout_s: int | None, memory_mb: int | None, cpus: int | None,
          wait: bool) -> None:
    """Run JOB_ID again: same bundle, same exact packages, optional new arguments."""
    overrides: dict[str, Any] = {}
    if args:
        overrides["args"] = list(args)
    if env:
        overrides["env"] = _pairs(env, "--env")
    for key, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("cpus", cpus)):
        if value is not None:
            overrides[key] = value
    client = _cli()._client(ctx)
    job = _cli()._call(client.rerun, job_id, **overrides)
    click.echo(f"{job['id']} {job.get('state')} ({job.get('name')}, re-runs {job_id})")
    if wait:
        try:
            job = _cli()._follow(client, job["id"])
        except KeyboardInterrupt:
            _cli()._interrupted([job["id"]])
        _cli()._report_end(job, logged=True)


@click.command()
@click.argument("group_id")
@click.pass_context
def group(ctx: click.Context, group_id: str) -> None:
    """Show a sweep's jobs and their states."""
    data = _cli()._call(_cli()._client(ctx).group, group_id)
    click.echo(f"group {data['id']} ({data['name']}): {data['size']} jobs, "
               + ("done" if data["done"] else "running"))
    for member in data["jobs"]:
        click.echo(f"{member['id'][:8]}  {member.get('state'):<11} "
                   f"{member.get('outcome') or '-':<9}  {member.get('name')}")


COMMANDS = (receipt, rerun, group)
