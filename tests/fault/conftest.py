"""Fixtures of the fault-injection suite: a throwaway RabbitMQ node per test module
(its own node name, port and data dir, so tests may stop, start and reconfigure it
without disturbing the machine's broker) and a labq system on it.

A module sets ``BROKER_CONF`` (extra rabbitmq.conf lines), ``BROKER_TICK_MS`` and
``SYSTEM_ENV``/``SYSTEM_WORKERS`` to shape them. Without ``rabbitmq-server`` installed the
suite skips locally and fails under CI (``CI=true``), so it never passes silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import FAULT_ENV, Broker, ThrowawayBroker, rabbitmq_installed
from helpers import LabqSystem


@pytest.fixture(scope="module")
def broker_node(request: pytest.FixtureRequest) -> Iterator[Broker]:
    if not rabbitmq_installed():
        message = "rabbitmq-server is not installed: the fault suite needs a throwaway node"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    node = ThrowawayBroker(
        conf=getattr(request.module, "BROKER_CONF", ()),
        tick_interval_ms=getattr(request.module, "BROKER_TICK_MS", None),
    )
    node.start()
    try:
        yield Broker(node)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def fault_system(broker_node: Broker, request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    """A backend and workers of labq on the throwaway broker, for one module."""
    env = {**FAULT_ENV, **getattr(request.module, "SYSTEM_ENV", {})}
    system = LabqSystem(tmp_path_factory.mktemp("labq-fault"),
                        workers=getattr(request.module, "SYSTEM_WORKERS", 2),
                        env=env, rabbitmq_url=broker_node.url)
    try:
        system.start()
        yield system
    finally:
        if not broker_node.node.is_up:
            broker_node.broker_up()
        system.stop()


@pytest.fixture
def fault_dir(tmp_path: Path) -> Path:
    """Where probe jobs record their runs (see faultkit.PROBE)."""
    folder = tmp_path / "runs"
    folder.mkdir()
    folder.chmod(0o777)
    return folder
