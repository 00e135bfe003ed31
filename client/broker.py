"""Make sure a RabbitMQ broker answers at ``LABQ_RABBITMQ_URL`` (used by ``labq up``,
``labq broker-check`` and so by ``make run`` / ``make test``).

If the broker does not answer, and the URL points at this machine, and
``rabbitmq-server`` is installed, start it (``rabbitmq-server -detached``) and wait
for it. Otherwise fail with a message that says exactly how to get one.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pika

log = logging.getLogger(__name__)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", ""})
START_TIMEOUT_S = 60.0


class BrokerError(Exception):
    """The broker cannot be reached and labq cannot start one; the message says what to do."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print); a comma-separated
    list of a cluster's node URLs is masked node by node."""
    if "," in url:
        return ",".join(mask_url(one.strip()) for one in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_local_url(url: str) -> bool:
    """True when the AMQP URL names this machine (so labq may start a broker for it)."""
    if "," in url:  # a cluster's nodes: never started by labq
        return False
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return host.lower() in LOCAL_HOSTS


def broker_reachable(url: str, timeout_s: float = 3.0) -> bool:
    """True when an AMQP connection to ``url`` opens (credentials and vhost included);
    for a cluster's comma-separated node URLs, when one node answers."""
    if "," in url:
        return any(broker_reachable(one.strip(), timeout_s) for one in url.split(",")
                   if one.strip())
    try:
        params = pika.URLParameters(url)
    except Exception:  # noqa: BLE001 - a malformed URL is "not reachable", said by the caller
        return False
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = timeout_s
    params.blocked_connection_timeout = timeout_s
    try:
        pika.BlockingConnection(params).close()
        return True
    except (pika.exceptions.AMQPError, OSError):
        return False


def how_to_get_a_broker(url: str) -> str:
    return (
        f"RabbitMQ is not reachable at {mask_url(url)}. Get one of:\n"
        "  - install it on this machine:  sudo apt-get install -y rabbitmq-server\n"
        "    (labq starts it for you next time; or: sudo rabbitmq-server -detached)\n"
        "  - run it with Docker:          docker run -d -p 5672:5672 rabbitmq:3\n"
        "  - use an existing broker:      export LABQ_RABBITMQ_URL=amqp://USER:PASS@HOST:5672/%2F"
    )


def start_local_broker() -> None:
    """Start the installed ``rabbitmq-server`` in the background (needs root)."""
    server = shutil.which("rabbitmq-server") or _sbin("rabbitmq-server")
    if server is None:
        raise FileNotFoundError("rabbitmq-server")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise BrokerError(
            "RabbitMQ is installed but not running, and starting it needs root: run\n"
            "  sudo rabbitmq-server -detached      (or: sudo systemctl start rabbitmq-server)\n"
            "then try again.")
    log.info("starting the local RabbitMQ: %s -detached", server)
    result = subprocess.run([server, "-detached"], capture_output=True, text=True,
                            timeout=60, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BrokerError("rabbitmq-server -detached failed: " + " | ".join(tail))


def _sbin(name: str) -> str | None:
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def ensure_broker(url: str, *, start: bool = True, timeout_s: float = START_TIMEOUT_S,
                  reachable: Callable[[str], bool] = broker_reachable,
                  starter: Callable[[], None] = start_local_broker,
                  installed: Callable[[], bool] | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> bool:
    """Make sure the broker answers: False if it already did, True if we started it.

    Raises :class:`BrokerError` with instructions when there is no broker to be had.
    (The callables are for tests.)
    """
    if reachable(url):
        return False
    is_installed = (installed() if installed is not None
                    else bool(shutil.which("rabbitmq-server") or _sbin("rabbitmq-server")))
    if not (start and is_local_url(url) and is_installed):
        raise BrokerError(how_to_get_a_broker(url))
    starter()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reachable(url):
            log.info("RabbitMQ is up at %s", mask_url(url))
            return True
        sleep(1.0)
    raise BrokerError(
        f"started rabbitmq-server but it did not answer at {mask_url(url)} within "
        f"{timeout_s:g}s; look at /var/log/rabbitmq/ (or `sudo rabbitmqctl status`)")
