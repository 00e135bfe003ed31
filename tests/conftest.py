"""Shared fixtures. Integration tests need the real RabbitMQ: they skip locally when
it is unreachable and fail under CI (``CI=true``), so a missing broker never passes
silently."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import RABBITMQ_URL, LabqSystem  # noqa: E402


def _broker_up() -> bool:
    try:
        params = pika.URLParameters(RABBITMQ_URL)
        params.connection_attempts = 1
        params.socket_timeout = 3
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False


@pytest.fixture(scope="session")
def broker() -> str:
    if not _broker_up():
        message = f"RabbitMQ is not reachable at {RABBITMQ_URL}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return RABBITMQ_URL


@pytest.fixture(scope="module")
def system(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    """One backend and two workers shared by the tests of a module."""
    sys_ = LabqSystem(tmp_path_factory.mktemp("labq"), workers=2)
    try:
        sys_.start()
        yield sys_
    finally:
        sys_.stop()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Kill what a failed test left running. A test that fails before it stops its job
    leaves the job's process alive, and the thread waiting for it then keeps pytest from
    ever exiting: CI would hang instead of reporting the failure."""
    import contextlib
    import signal

    left = _descendants(os.getpid())
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        print(f"\nconftest: killed {len(left)} process(es) tests left running: {left}")
