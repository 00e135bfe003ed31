"""A small Python SDK for labq's REST API (v1). It speaks HTTP only.

::

    from labq.client.api import Client

    labq = Client("http://127.0.0.1:8080")
    job = labq.submit("examples/hello")          # a folder (zipped for you) or a .zip
    job = labq.wait(job["id"])                   # until the job is stopped or failed
    print(job["outcome"], labq.log(job["id"])[0])
    labq.download_results(job["id"], "hello-results.zip")

Every failure is a :class:`ClientError` whose message is one readable line: the
server's own ``{"error": {"message"}}`` when it answered, or what to do when it did not.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3

from labq.client.bundles import bundle_file
from labq.client.credentials import find_token
from labq.client.errors import ClientError
from labq.client.multipart import MultipartBody, ProgressFn
from labq.client.sse import iter_sse

DEFAULT_URL = "http://127.0.0.1:8080"
#: States after which nothing more happens to a job.
TERMINAL_STATES = frozenset({"stopped", "failed"})
_CHUNK = 256 * 1024

__all__ = ["DEFAULT_URL", "TERMINAL_STATES", "Client", "ClientError"]


# -- the client ------------------------------------------------------------------


class Client:
    """One labq server. ``url`` defaults to ``$LABQ_URL``, else http://127.0.0.1:8080."""

    def __init__(self, url: str | None = None, timeout_s: float = 30.0,
                 session: requests.Session | None = None, token: str | None = None) -> None:
        """``token``: the API token; default ``LABQ_TOKEN``, then the token ``labq login``
        saved for this server, then (a server on this machine) ``$LABQ_DATA_DIR/admin-token``."""
        self.url = (url or os.environ.get("LABQ_URL") or DEFAULT_URL).rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self.token, self.token_source = (token, "argument") if token else find_token(self.url)
        if self.token:
            self.session.headers["Authorization"] = f"Bearer {self.token}"

    # -- plumbing ----------------------------------------------------------------
    def _request(self, method: str, path: str, *, stream: bool = False,
                 timeout: float | None | tuple[float, float | None] = -1.0,
                 **kwargs: Any) -> requests.Response:
        if timeout == -1.0:
            timeout = self.timeout_s
        try:
            resp = self.session.request(method, f"{self.url}{path}", stream=stream,
                                        timeout=timeout, **kwargs)
        except requests.ConnectionError as exc:
            raise ClientError(
                f"cannot reach labq at {self.url} — is `make run` running? "
                "(or point LABQ_URL / --url at your server)") from exc
        except requests.Timeout as exc:
            raise ClientError(f"labq at {self.url} did not answer in time; try again") from exc
        except requests.RequestException as exc:
            raise ClientError(f"request to {self.url}{path} failed: {exc}") from exc
        if resp.status_code >= 400:
            raise _error_from(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError as exc:
            raise ClientError(
                f"{self.url} answered {path} with something that is not labq's JSON "
                "(is LABQ_URL pointing at a labq server?)") from exc

    # -- health --------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        return self._json("GET", "/readyz")

    # -- accounts ------------------------------------------------------------------
    def me(self) -> dict[str, Any]:
        """Who this client is signed in as: ``{"name", "admin", "via", "token_id"}``."""
        return self._json("GET", "/api/v1/me")

    def login(self, name: str, password: str, token_name: str = "labq login") -> dict[str, Any]:
        """Exchange a user name and password for a new API token (``{"id", "token"}``)."""
        resp = self._request("POST", "/api/v1/tokens", json={"name": token_name},
                             auth=(name, password), headers={"Authorization": None})
        return resp.json()

    def tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/v1/tokens")["tokens"]

    def create_token(self, name: str = "token") -> dict[str, Any]:
        return self._json("POST", "/api/v1/tokens", json={"name": name})

    def revoke_token(self, token_id: int) -> None:
        self._request("DELETE", f"/api/v1/tokens/{int(token_id)}")

    # -- jobs ----------------------------------------------------------------------
    def submit(self, path: Path | str, *, fields: dict[str, Any] | None = None,
               progress: ProgressFn | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Upload a bundle (a .zip, or a folder zipped on the fly); return the new job.

        ``fields`` are optional form fields that override the bundle's ``labq.toml``
        (e.g. ``{"name": "run-3", "timeout_s": 600}``).
        """
        form = {k: str(v) for k, v in (fields or {}).items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        with bundle_file(path) as zip_path:
            filename = f"{Path(path).resolve().name.removesuffix('.zip')}.zip"
            body = MultipartBody(form, "bundle", zip_path, filename, progress)
            headers["Content-Type"] = body.content_type
            try:
                # A sized iterable: requests sends Content-Length (not chunked) and streams
                # it from disk. No read timeout: a big upload takes as long as it takes.
                return self._json("POST", "/api/v1/jobs", data=body, headers=headers,
                                  timeout=(10.0, None))
            finally:
                body.close()

    def jobs(self, *, state: str | None = None, name: str | None = None,
             limit: int | None = None, cursor: str | None = None,
             **filters: Any) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"jobs": [...], "next_cursor": ...}``.

        ``filters``: q (name substring), outcome, since, until (dates), sort
        (created, -created, duration, -duration), group."""
        params = {k: v for k, v in {"state": state, "name": name, "limit": limit,
                                    "cursor": cursor, **filters}.items()
                  if v not in (None, "")}
        return self._json("GET", "/api/v1/jobs", params=params)

    def iter_jobs(self, *, state: str | None = None, name: str | None = None,
                  limit: int | None = None, **filters: Any) -> Iterator[dict[str, Any]]:
        """Jobs newest first, following pages, at most ``limit`` of them (None: all)."""
        cursor: str | None = None
        seen = 0
        while True:
            page_size = min(limit - seen, 100) if limit else 100
            page = self.jobs(state=state, name=name, limit=page_size, cursor=cursor,
                             **filters)
            for job in page.get("jobs", []):
                yield job
                seen += 1
                if limit and seen >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor or not page.get("jobs"):
                return

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{job_id}")

    def receipt(self, job_id: str) -> dict[str, Any]:
        """What exactly ran: bundle, arguments, packages, versions, result hashes."""
        return self._json("GET", f"/api/v1/jobs/{job_id}/receipt")

    def rerun(self, job_id: str, **overrides: Any) -> dict[str, Any]:
        """A new job from the same bundle and packages; overrides: args, env, limits."""
        return self._json("POST", f"/api/v1/jobs/{job_id}/rerun", json=overrides)

    def group(self, group_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/groups/{group_id}")

    def wait_group(self, group_id: str, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until every job of the group has ended; return the group."""
        while True:
            group = self.group(group_id)
            if group.get("done"):
                return group
            time.sleep(poll_s)

    def state(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{job_id}/state")

    def set_state(self, job_id: str, state: str) -> dict[str, Any]:
        return self._json("PUT", f"/api/v1/jobs/{job_id}/state", json={"state": state})

    def pause(self, job_id: str) -> dict[str, Any]:
        return self.set_state(job_id, "paused")

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.set_state(job_id, "started")

    def stop(self, job_id: str) -> dict[str, Any]:
        return self.set_state(job_id, "stopped")

    def wait(self, job_id: str, timeout_s: float | None = None,
             poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job is ``stopped`` or ``failed``; return it."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.get("state") in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(
                    f"job {job_id} is still {job.get('state')} after {timeout_s:g}s")
            time.sleep(poll_s)

    # -- logs ----------------------------------------------------------------------
    def log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The job's log from byte ``offset``; returns (text, total size in bytes)."""
        resp = self._request("GET", f"/api/v1/jobs/{job_id}/log", params={"offset": offset})
        size = resp.headers.get("X-Log-Size")
        text = resp.content.decode("utf-8", errors="replace")
        return text, int(size) if size and size.isdigit() else offset + len(resp.content)

    def follow_log(self, job_id: str, offset: int = 0,
                   poll_s: float = 1.0) -> Iterator[str]:
        """Yield the job's log as it grows, until the job ends.

        Uses the server-sent event stream; if that breaks or is not offered, goes on by
        polling ``?offset=`` so nothing is printed twice or skipped.
        """
        position = [offset]  # the byte offset reached, shared with the stream reader
        ended = yield from self._stream_log(job_id, position)
        if ended:
            return
        while True:  # polling fallback
            done = self.job(job_id).get("state") in TERMINAL_STATES
            text, size = self._log_or_empty(job_id, position[0])
            if text:
                yield text
            position[0] = max(size, position[0] + len(text.encode("utf-8")))
            if done:
                return
            time.sleep(poll_s)

    def _stream_log(self, job_id: str, position: list[int]) -> Iterator[str]:
        """Yield the log from the event stream; return True when the job ended, False
        when the stream broke or is not offered (``position`` tells where to go on)."""
        try:
            resp = self._request(
                "GET", f"/api/v1/jobs/{job_id}/log", params={"offset": position[0]},
                headers={"Accept": "text/event-stream"}, stream=True, timeout=(10.0, 60.0))
        except ClientError as exc:
            if exc.status is None:
                raise
            self.job(job_id)  # an unknown job is an error; anything else: poll instead
            return False
        try:
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return False
            for event, data, last_id in iter_sse(resp):
                if event == "end":
                    return True
                if event in ("message", "log") and data:
                    # The server's id is the byte offset reached; counting the text
                    # ourselves would drift (it turns \r\n into \n, bad bytes into U+FFFD).
                    position[0] = int(last_id) if last_id and last_id.isdigit() else \
                        position[0] + len(data.encode("utf-8"))
                    yield data
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            pass  # the stream broke: go on by polling from where we are
        finally:
            resp.close()
        return False

    def _log_or_empty(self, job_id: str, offset: int) -> tuple[str, int]:
        try:
            return self.log(job_id, offset)
        except ClientError as exc:
            if exc.status == 404:  # no log written yet
                return "", offset
            raise

    # -- results -------------------------------------------------------------------
    def download_results(self, job_id: str, dest: Path | str) -> Path:
        """Save the zip of the job's ``output/`` to ``dest``."""
        dest = Path(dest)
        resp = self._request("GET", f"/api/v1/jobs/{job_id}/results", stream=True,
                             timeout=(10.0, 300.0))
        tmp = dest.with_name(dest.name + ".part")
        try:
            with open(tmp, "wb") as out:
                for chunk in resp.iter_content(_CHUNK):
                    out.write(chunk)
            os.replace(tmp, dest)
        finally:
            resp.close()
            tmp.unlink(missing_ok=True)
        return dest

    def result_files(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{job_id}/results/files")


def _error_from(resp: requests.Response) -> ClientError:
    code = None
    details: dict[str, Any] = {}
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = err.get("code")
            details = {k: v for k, v in err.items() if k not in ("code", "message")}
            message = str(err.get("message") or code or resp.reason)
        else:
            message = f"HTTP {resp.status_code} {resp.reason}"
    except ValueError:
        text = resp.text.strip().splitlines()
        message = f"HTTP {resp.status_code} {resp.reason}" + (f": {text[0][:200]}"
                                                               if text else "")
    return ClientError(message, status=resp.status_code, code=code, details=details)
