"""What the capacity benchmarks add to :class:`bench.stack.Stack` (a labq of the run's own,
started as ``labq backend`` / ``labq worker`` with authentication on): researchers made
with the server-side ``labq user add``, a PostgreSQL schema of the run's own (dropped at
the end), and room for a thousand open connections in the benchmark's process.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Iterator

from stack import Stack

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def backend_env() -> dict[str, str]:
    """``LABQ_BACKEND_*`` of this environment, for the run's labq (``Stack`` passes on no
    ``LABQ_*`` of its own): ``LABQ_BACKEND_PROCESSES=1`` compares one process with
    several."""
    return {k: v for k, v in os.environ.items() if k.startswith("LABQ_BACKEND_")}


def raise_open_files(wanted: int) -> int:
    """Lift this process's soft limit on open files towards ``wanted`` (holding a thousand
    connections needs more than the usual 1,024); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def add_user(stack: Stack, name: str) -> str:
    """A researcher made with ``labq user add`` on the run's labq; returns their token."""
    done = subprocess.run([sys.executable, "-m", "labq.client.cli", "user", "add", name],
                          env=stack.env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"labq user add {name} failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def database(url: str) -> Iterator[dict[str, str]]:
    """Environment for a Stack on ``url``: SQLite (empty ``url``: the data dir's file) or a
    PostgreSQL schema of this run's own, dropped when the block ends."""
    if not url:
        yield {}
        return
    if not url.startswith("postgresql"):
        raise SystemExit(f"--database must be a postgresql:// URL (or empty for SQLite), "
                         f"not {url!r}")
    import sqlalchemy

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    try:
        yield {"LABQ_DATABASE_URL": f"{url}{sep}options=-csearch_path%3D{schema}"}
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
