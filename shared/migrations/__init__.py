"""The database schema's history: Alembic migrations, applied when a service starts.

Every change to a table is a new file in ``versions/`` (``NNNN_what.py``, revisions
numbered in order, each naming the one before it as ``down_revision``); nothing calls
``metadata.create_all``. :func:`upgrade` brings any labq database to the newest revision:

* a new database gets every migration;
* a database made before migrations existed (the tables are there but Alembic's
  version table is not) is stamped as the baseline first, then upgraded;
* several processes starting at once upgrade one at a time (an advisory lock on
  PostgreSQL, a file lock beside the database on SQLite).

To add a migration: copy the newest file in ``versions/``, bump the number, set
``down_revision`` to the previous ``revision``, and write ``upgrade()`` with ``op.*``
calls that work on both SQLite (use ``op.batch_alter_table`` to change columns) and
PostgreSQL. ``tests/unit/test_migrations.py`` checks that the migrated schema matches
:data:`labq.shared.db.metadata` on both engines.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
#: Any key works as long as every labq process uses the same one.
_PG_LOCK_KEY = 0x6C616271  # "labq"


def config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this version of labq knows."""
    return ScriptDirectory.from_config(config()).get_current_head() or BASELINE


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database at ``engine`` to :func:`head`, safely from several processes."""
    with _exclusive(engine), engine.begin() as conn:
        before = current(conn)
        names = set(inspect(conn).get_table_names())
        if before is None and "jobs" in names:
            # Made by labq before migrations: that schema is exactly the baseline.
            log.info("database predates migrations: stamping it as revision %s", BASELINE)
            command.stamp(config(conn), BASELINE)
            before = BASELINE
        target = head()
        if before != target:
            log.info("migrating the database from %s to %s", before or "empty", target)
            command.upgrade(config(conn), "head")


@contextlib.contextmanager
def _exclusive(engine: Engine) -> Iterator[None]:
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
