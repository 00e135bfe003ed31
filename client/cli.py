"""The ``labq`` command line: run the services, and talk to a server as a researcher.

Service commands (``up``, ``backend``, ``worker``) read settings from ``LABQ_*`` and
call the service's ``run(settings)``; researcher commands speak HTTP only, to
``LABQ_URL`` (default http://127.0.0.1:8080).
"""

from __future__ import annotations

import sys

import click

from shared.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """labq: a job server for research labs."""


@main.command()
def backend() -> None:
    """Run the REST API and web pages (gunicorn) on LABQ_HOST:LABQ_PORT."""
    from backend.server import run

    sys.exit(run(Settings.from_env()))


@main.command()
def worker() -> None:
    """Run one worker: take one job at a time from RabbitMQ and run it."""
    from consumer.worker import run

    sys.exit(run(Settings.from_env()))


if __name__ == "__main__":
    main()
