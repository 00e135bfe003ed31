"""Reading the database cheaply (shared/db.py): reads in autocommit, one connection per
request, a pooled connection tested only after it sat idle — and still nothing stale or
broken is served: a connection the database dropped while idle is replaced unseen."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy import text

from labq.shared import db
from labq.shared.db import make_engine
from labq.shared.settings import Settings

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture()
def pg_engine(tmp_path: Path):
    try:
        probe = sqlalchemy.create_engine(PG_URL)
        with probe.connect():
            pass
        probe.dispose()
    except sqlalchemy.exc.OperationalError:
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    engine = make_engine(Settings(data_dir=tmp_path, database_url=PG_URL), pool_size=1,
                         max_overflow=1)
    engine.dispose()  # the migrations' connections: one pooled connection from here on
    yield engine
    engine.dispose()


def test_reads_share_one_connection_within_a_block_and_give_it_back(engine):
    pool = engine.pool
    with db.sharing_reads(engine):
        with db.read(engine) as first:
            first.execute(text("SELECT 1"))
        with db.read(engine) as second:
            assert second is first  # the same connection, still open
        assert pool.checkedout() == 1
    assert pool.checkedout() == 0  # given back when the block ended
    with db.read(engine) as alone, db.read(engine) as other:
        assert alone is not other  # outside a block each read has its own


def test_writes_never_use_the_shared_read_connection(engine):
    with db.sharing_reads(engine):
        with db.read(engine) as reader:
            pass
        with engine.begin() as writer:
            assert writer is not reader
            writer.execute(text("CREATE TABLE t (x INTEGER)"))
            writer.execute(text("INSERT INTO t VALUES (1)"))
        with db.read(engine) as again:  # sees the committed write at once
            assert again.execute(text("SELECT x FROM t")).scalar() == 1


def test_postgres_reads_run_outside_a_transaction(pg_engine):
    # No BEGIN before a read and no ROLLBACK after it: a round trip each, saved
    with db.read(pg_engine) as conn:
        conn.execute(text("SELECT 1"))
        status = conn.connection.dbapi_connection.info.transaction_status
    import psycopg.pq

    assert status == psycopg.pq.TransactionStatus.IDLE
    with pg_engine.begin() as conn:  # a write still gets its transaction
        conn.execute(text("SELECT 1"))
        status = conn.connection.dbapi_connection.info.transaction_status
    assert status == psycopg.pq.TransactionStatus.INTRANS


def _backend_pid(engine) -> int:
    with db.read(engine) as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _terminate(pid: int) -> None:
    killer = sqlalchemy.create_engine(PG_URL)
    with killer.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        conn.commit()
    killer.dispose()


def test_a_connection_dropped_while_idle_is_replaced_unseen(pg_engine, monkeypatch):
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.05)
    before = _backend_pid(pg_engine)
    # Given the database dropped the pooled connection while it sat idle (a restart)
    _terminate(before)
    time.sleep(0.1)
    # Then the next read finds it dead, replaces it and succeeds
    assert _backend_pid(pg_engine) != before


def test_a_connection_dropped_while_busy_fails_once_then_the_pool_recovers(pg_engine):
    before = _backend_pid(pg_engine)
    _terminate(before)  # no idle time: it is handed out untested
    with pytest.raises(sqlalchemy.exc.OperationalError), db.read(pg_engine) as conn:
        conn.execute(text("SELECT 1"))
    assert _backend_pid(pg_engine) != before  # the pool threw the dead one away
