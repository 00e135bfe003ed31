"""The schema's history: a new database and one made before migrations both reach head,
and the migrated schema is exactly what :mod:`labq.shared.db` declares, on SQLite and on
PostgreSQL (when reachable; under CI it must be)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from labq.shared import migrations
from labq.shared.db import metadata

PG_URL = os.environ.get("LABQ_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# The schema labq 0.1 created with metadata.create_all, before migrations existed.
LEGACY_SCHEMA = """
CREATE TABLE jobs (
    id VARCHAR(32) NOT NULL, name VARCHAR(200) NOT NULL, state VARCHAR(16) NOT NULL,
    requested_state VARCHAR(16), outcome VARCHAR(16), exit_code INTEGER,
    attempts INTEGER NOT NULL, error TEXT, worker VARCHAR(200),
    bundle_sha256 VARCHAR(64) NOT NULL, bundle_bytes BIGINT NOT NULL, spec TEXT NOT NULL,
    seq INTEGER NOT NULL, idempotency_key VARCHAR(200), updated_at FLOAT NOT NULL,
    created_at FLOAT, queued_at FLOAT, initialized_at FLOAT, started_at FLOAT,
    paused_at FLOAT, completed_at FLOAT, stopped_at FLOAT, failed_at FLOAT,
    PRIMARY KEY (id), UNIQUE (idempotency_key)
);
CREATE INDEX ix_jobs_created ON jobs (created_at, id);
CREATE INDEX ix_jobs_state ON jobs (state);
CREATE INDEX ix_jobs_name ON jobs (name);
CREATE TABLE events (
    id INTEGER NOT NULL, job_id VARCHAR(32) NOT NULL, seq INTEGER NOT NULL,
    state VARCHAR(16) NOT NULL, outcome VARCHAR(16), at FLOAT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX ix_events_job_id ON events (job_id);
INSERT INTO jobs (id, name, state, attempts, bundle_sha256, bundle_bytes, spec, seq,
                  updated_at, created_at, stopped_at, outcome, exit_code)
VALUES ('legacyjob0000000000000000000001', 'old', 'stopped', 1, 'ab', 10, '{}', 5,
        1.0, 1.0, 2.0, 'succeeded', 0);
"""


def _schema_diff(engine: sa.Engine) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_a_new_sqlite_database_is_migrated_to_head_and_matches_the_tables(tmp_path: Path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'labq.db'}")
    migrations.upgrade(engine)
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
    assert _schema_diff(engine) == []


def test_a_database_made_before_migrations_upgrades_and_keeps_its_jobs(tmp_path: Path):
    # Given a database exactly as labq created it before migrations, with one job
    path = tmp_path / "labq.db"
    with sqlite3.connect(path) as db:
        db.executescript(LEGACY_SCHEMA)
    engine = sa.create_engine(f"sqlite:///{path}")
    # When labq starts (twice: the second start finds nothing to do)
    migrations.upgrade(engine)
    migrations.upgrade(engine)
    # Then it is at head, its schema is today's, and the old job is still there
    with engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        row = conn.execute(sa.text("SELECT name, state, outcome FROM jobs")).one()
    assert tuple(row) == ("old", "stopped", "succeeded")
    assert _schema_diff(engine) == []


@pytest.fixture
def pg_engine():
    try:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as conn:
            schema = f"mig_{uuid.uuid4().hex[:10]}"
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}")
    engine = sa.create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    yield engine
    engine.dispose()
    with admin.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def test_postgresql_new_and_legacy_databases_reach_head(pg_engine: sa.Engine):
    # A legacy database on PostgreSQL: the same DDL (BIGINT/FLOAT are valid there too).
    with pg_engine.begin() as conn:
        for statement in LEGACY_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(sa.text(statement))
    migrations.upgrade(pg_engine)
    with pg_engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1
    assert _schema_diff(pg_engine) == []
