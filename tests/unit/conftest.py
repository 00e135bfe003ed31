"""Fixtures the unit tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from labq.shared.db import make_engine
from labq.shared.settings import Settings


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    """labq's database, migrated, in SQLite under the test's tmp_path."""
    engine = make_engine(Settings(data_dir=tmp_path))
    yield engine
    engine.dispose()
