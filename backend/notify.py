"""Webhooks: a JSON POST to a job's ``notify_url`` when it ends.

The event applier calls :meth:`Notifier.job_ended` after it applied a terminal event; the
POST is made from a small bounded thread pool, retried with backoff (1, 4, 16 s) on
connection errors and 5xx/429 answers, and whatever happens is only logged: a webhook
never changes the job. Targets on loopback, private, link-local or otherwise
non-global addresses are refused (checked when the URL is given, and again for every
address the name resolves to when it is sent, so DNS cannot point it inward later),
unless the admin sets ``LABQ_WEBHOOK_ALLOW_PRIVATE=1``. Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import requests

from labq.shared.errors import ManifestError

log = logging.getLogger(__name__)

MAX_URL = 2000
POOL_THREADS = 4
#: Webhooks waiting beyond this are dropped (logged): a dead receiver must not pile up.
MAX_PENDING = 1000
BACKOFF_S = (1.0, 4.0, 16.0)
TIMEOUT_S = 10.0


def check_notify_url(raw: Any, settings: Any) -> str:
    """The URL if it may be used; ManifestError (422) saying why not otherwise."""
    if not isinstance(raw, str) or len(raw) > MAX_URL:
        raise ManifestError("notify_url must be an http(s) URL", field="notify_url")
    try:
        parts = urlsplit(raw.strip())
        hostname = parts.hostname  # both raise ValueError for a broken [IPv6] host
    except ValueError:
        raise ManifestError(f"notify_url is not a valid URL, got {raw!r}",
                            field="notify_url") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ManifestError(f"notify_url must be an http(s) URL, got {raw!r}",
                            field="notify_url")
    if parts.username or parts.password:
        raise ManifestError("notify_url must not carry a user name or password",
                            field="notify_url")
    if not settings.webhook_allow_private:
        try:
            address = ipaddress.ip_address(hostname)
        except ValueError:
            address = None  # a name: checked on every send, when it is resolved
        if address is not None and not address.is_global:
            raise ManifestError(
                f"notify_url points to a non-public address ({address}); the admin can "
                "allow that with LABQ_WEBHOOK_ALLOW_PRIVATE=1", field="notify_url")
    return raw.strip()


def _public(host: str, port: int) -> bool:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_global for i in infos)


class Notifier:
    def __init__(self, settings: Any, stop: threading.Event,
                 backoff: tuple[float, ...] = BACKOFF_S) -> None:
        self.settings = settings
        self.stop = stop
        self.backoff = backoff
        self.pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="labq-webhook")
        self._pending = threading.BoundedSemaphore(MAX_PENDING)

    def job_ended(self, job: dict[str, Any]) -> None:
        """Queue the POST for a job that just ended (no-op without notify_url)."""
        url = job.get("notify_url")
        if not url:
            return
        if not self._pending.acquire(blocking=False):
            log.warning("webhook for job %s dropped: %d already waiting", job["id"],
                        MAX_PENDING)
            return
        body = {"event": "job.ended", "job": {k: job.get(k) for k in (
            "id", "name", "state", "outcome", "exit_code", "error", "group_id",
            "created_at", "stopped_at", "failed_at", "durations", "links")}}
        self.pool.submit(self._send, url, body)

    def _send(self, url: str, body: dict[str, Any]) -> None:
        try:
            for attempt, delay in enumerate((0.0, *self.backoff), start=1):
                if delay and self.stop.wait(delay):
                    return
                if self._post(url, body, attempt):
                    return
            log.warning("webhook %s for job %s gave up after %d attempts", url,
                        body["job"]["id"], len(self.backoff) + 1)
        except Exception:  # a webhook must never take anything else down
            log.exception("webhook %s failed", url)
        finally:
            self._pending.release()

    def _post(self, url: str, body: dict[str, Any], attempt: int) -> bool:
        """True when done (delivered, or refused for good)."""
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if not self.settings.webhook_allow_private and not _public(parts.hostname or "", port):
            log.warning("webhook %s refused: it does not resolve to public addresses only",
                        url)
            return True
        try:
            resp = requests.post(url, data=json.dumps(body), timeout=TIMEOUT_S,
                                 allow_redirects=False,
                                 headers={"Content-Type": "application/json",
                                          "User-Agent": "labq-webhook"})
        except requests.RequestException as exc:
            log.info("webhook %s attempt %d: %s", url, attempt, exc.__class__.__name__)
            return False
        if resp.status_code >= 500 or resp.status_code == 429:
            log.info("webhook %s attempt %d: HTTP %d", url, attempt, resp.status_code)
            return False
        log.info("webhook %s for job %s: HTTP %d", url, body["job"]["id"], resp.status_code)
        return True

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

