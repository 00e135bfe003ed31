"""The job registry: the backend's domain layer over the database.

Views stay thin and call these functions. Every change of a job's ``state`` goes
through :func:`shared.jobstore.move`, re-reading and deciding again when another
thread won the race, so concurrent requests and events never lose an update.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError

from labq.backend import search
from labq.backend.jobfields import extra_fields
from labq.producer import fairshare
from labq.producer.control import WorkerUnreachableError, send_control
from labq.producer.publisher import Publisher
from labq.shared import db, jobstore, lifecycle
from labq.shared.durations import event_measures, timestamps_for
from labq.shared.errors import BadRequestError, BrokerUnavailableError, NotFoundError
from labq.shared.lifecycle import ACTION_FOR_STATE, Decision, Outcome, State
from labq.shared.manifest import JobSpec
from labq.shared.messages import LifecycleEvent
from labq.shared.settings import Settings
from labq.shared.storage import Storage, is_job_id, new_job_id

log = logging.getLogger(__name__)

MAX_RACE_RETRIES = 50
DEFAULT_LIMIT = 50
MAX_LIMIT = 500


class Registry:
    def __init__(self, engine: Engine, storage: Storage,
                 settings: Settings | None = None) -> None:
        self.engine = engine
        self.storage = storage
        self.settings = settings or Settings()

    # -- reading ----------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any]:
        if not is_job_id(job_id):
            raise NotFoundError(f"there is no job {job_id!r}", job_id=job_id)
        with db.read(self.engine) as conn:
            rows = db.dicts(conn.execute(db.JOB_BY_ID, {"job_id": job_id}))
        if not rows:
            raise NotFoundError(f"there is no job {job_id!r}", job_id=job_id)
        return rows[0]

    def list(self, *, state: str | None = None, name: str | None = None,
             limit: int | None = None, cursor: str | None = None, owner: str | None = None
             ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first, keyset-paginated on (created_at, id); ``owner`` None: everyone's.
        (The one query behind it, with every filter, is :func:`backend.search.search`.)"""
        limit = DEFAULT_LIMIT if limit is None else limit
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequestError(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
        args = {"state": state or "", "name": name or "", "cursor": cursor or ""}
        return search.search(self.engine, args, limit, owner=owner)

    def counts(self, owner: str | None = None) -> dict[str, int]:
        query = select(db.jobs.c.state, func.count()).group_by(db.jobs.c.state)
        if owner:
            query = query.where(db.jobs.c.owner == owner)
        with db.read(self.engine) as conn:
            found = dict(conn.execute(query).all())
        return {s.value: int(found.get(s.value, 0)) for s in State}

    def find_by_key(self, key: str, owner: str | None) -> dict[str, Any] | None:
        """The job ``owner`` submitted with this Idempotency-Key (keys are per user)."""
        with db.read(self.engine) as conn:
            row = conn.execute(
                select(db.jobs).where(db.jobs.c.idempotency_key == key,
                                      db.jobs.c.owner == owner)).mappings().first()
        return dict(row) if row else None

    # -- creating ---------------------------------------------------------------
    def create(self, *, name: str, spec: JobSpec, bundle_sha256: str, bundle_bytes: int,
               idempotency_key: str | None = None, owner: str | None = None,
               extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Insert a job in ``created`` (the outbox entry); returns (job, created_now).

        ``extra``: more columns set in the same insert (group_id, rerun_of, notify_url),
        so the outbox relay never publishes the job without them. Fair share decides in
        the same transaction: 429 past the owner's quota, or the job is held
        (``hold_reason``) past their running limit.
        """
        try:
            with self.engine.begin() as conn:
                held = fairshare.admit(conn, owner, self.settings) if owner else None
                row = jobstore.insert_job(conn, {
                    "id": new_job_id(), "name": name, "owner": owner, "hold_reason": held,
                    "bundle_sha256": bundle_sha256, "bundle_bytes": bundle_bytes,
                    "spec": json.dumps(spec.to_dict()), "idempotency_key": idempotency_key,
                    **(extra or {})})
        except IntegrityError:
            existing = self.find_by_key(idempotency_key, owner) if idempotency_key else None
            if existing is None:
                raise
            return existing, False
        return row, True

    # -- control ----------------------------------------------------------------
    def request_state(self, job_id: str, target: str,
                      publisher: Publisher | None) -> dict[str, Any]:
        """Carry out ``PUT /jobs/{id}/state``; returns the job afterwards.

        Raises ConflictError (409) for impossible requests and a 503 error when the
        control message cannot reach a worker.
        """
        for _ in range(MAX_RACE_RETRIES):
            job = self.get(job_id)
            plan = lifecycle.plan_user_request(job["state"], target,
                                               pending=job["requested_state"])
            if plan.decision == Decision.NOOP:
                return job
            state = State(job["state"])
            if plan.target == State.STOPPED:
                # The marker covers a worker that takes the job (or dies) before it hears.
                self.storage.job_dir(job_id).mkdir(parents=True, exist_ok=True)
                self.storage.mark_cancelled(job_id)
                if state in (State.CREATED, State.QUEUED):
                    if self._cancel_now(job):
                        return self.get(job_id)
                    continue  # it moved under us: decide again
            if publisher is None:
                raise BrokerUnavailableError("no broker connection to reach the worker")
            if not self._set_requested(job, plan.target):
                continue
            try:
                send_control(publisher, job_id, ACTION_FOR_STATE[plan.target])
            except WorkerUnreachableError:
                if plan.target != State.STOPPED:
                    self._set_requested({**job, "requested_state": plan.target},
                                        job["requested_state"])
                    raise
                # No worker is bound right now (it is reconnecting, or died and the job
                # is being redelivered): the cancel marker written above stops the job
                # wherever it runs next, so the request stands.
                log.info("job %s: no worker bound; the stop marker will carry it", job_id)
            except Exception:
                # Nobody was told: forget the request so it can be made again.
                self._set_requested({**job, "requested_state": plan.target},
                                    job["requested_state"])
                raise
            return self.get(job_id)
        raise RuntimeError(f"job {job_id}: too many concurrent changes; try again")

    def _cancel_now(self, job: dict[str, Any]) -> bool:
        with self.engine.begin() as conn:
            return jobstore.move(
                conn, job, State.STOPPED, seq=job["seq"] + 1,
                values={"outcome": Outcome.CANCELLED, "requested_state": None,
                        "hold_reason": None},
                event={"outcome": Outcome.CANCELLED, "attempt": job["attempts"]},
            ) is not None

    def _set_requested(self, job: dict[str, Any], requested: str | None) -> bool:
        """Record a pending request if the job is still as read (same state and seq)."""
        with self.engine.begin() as conn:
            return jobstore.set_requested(conn, job, requested)

    # -- events -----------------------------------------------------------------
    def apply_event(self, event: LifecycleEvent) -> dict[str, Any] | None:
        """Apply a worker's lifecycle event; the job's row afterwards when it changed the
        job (None when it did not).

        Stale (``seq`` not newer), duplicate and post-terminal events are dropped, and so
        are moves the state machine cannot reach; a lost compare-and-set race is retried.
        """
        try:
            target = State(event.state)
        except ValueError:
            log.warning("event for %s names unknown state %r; dropped", event.job_id,
                        event.state)
            return None
        for _ in range(MAX_RACE_RETRIES):
            try:
                job = self.get(event.job_id)
            except NotFoundError:
                log.warning("event for unknown job %s; dropped", event.job_id)
                return None
            state = State(job["state"])
            if not _applies(event, job, state, target):
                return None
            values = _event_values(event, job, state, target)
            with self.engine.begin() as conn:
                moved = jobstore.move(
                    conn, job, target, seq=event.seq, values=values, reach=True,
                    event={"outcome": event.outcome, "exit_code": event.exit_code,
                           "error": event.error, "attempt": event.attempt,
                           "worker": event.worker, "worker_host": event.worker_host,
                           "at": event.at})
            if moved is not None:
                return moved
        log.error("job %s: gave up applying event seq %s after repeated races",
                  event.job_id, event.seq)
        return None


def _applies(event: LifecycleEvent, job: dict[str, Any], state: State, target: State) -> bool:
    """False (and why, in the log) for a stale, post-terminal or unreachable event."""
    if lifecycle.is_terminal(state) or event.seq <= job["seq"]:
        log.debug("stale event for %s (seq %s <= %s or terminal); dropped",
                  event.job_id, event.seq, job["seq"])
        return False
    if target != state and not lifecycle.can_reach(state, target):
        log.warning("job %s: event %s → %s is not reachable; dropped",
                    event.job_id, state, target)
        return False
    return True


def _event_values(event: LifecycleEvent, job: dict[str, Any], state: State,
                  target: State) -> dict[str, Any]:
    """The job columns an event writes besides its state and seq."""
    values: dict[str, Any] = {"attempts": max(job["attempts"] or 0, event.attempt)}
    for field in ("worker", "worker_host", "outcome", "exit_code", "error"):
        if getattr(event, field) is not None:
            values[field] = getattr(event, field)
    # Reached, ended, or put back on the queue (the worker that was asked is gone).
    if job["requested_state"] == target or target == State.QUEUED \
            or lifecycle.is_terminal(target):
        values["requested_state"] = None
    values.update(timestamps_for(job, state, target, event.at))
    values.update(event_measures(event))
    return values


# -- JSON ------------------------------------------------------------------------


def iso_of(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC with milliseconds (``2024-05-01T12:00:00.000Z``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


#: :func:`iso_of`, remembered: job lists show the same jobs' times again and again.
#: (A time seen once, such as an estimate, goes through iso_of: it would only push the
#: remembered ones out.)
iso = functools.lru_cache(maxsize=65_536)(iso_of)


def job_to_json(row: dict[str, Any], base: str = "/api/v1/jobs") -> dict[str, Any]:
    job_id = row["id"]
    self_url = f"{base}/{job_id}"
    data: dict[str, Any] = {
        "id": job_id,
        "name": row["name"],
        "owner": row.get("owner"),
        "state": row["state"],
        "hold_reason": row.get("hold_reason"),
        "requested_state": row["requested_state"],
        "outcome": row["outcome"],
        "exit_code": row["exit_code"],
        "attempts": row["attempts"] or 0,
        "error": row["error"],
        "worker": row["worker"],
        "worker_host": row.get("worker_host"),
    }
    for column in db.STATE_TIMESTAMPS.values():
        data[column] = iso(row[column])
    data["updated_at"] = iso(row["updated_at"])
    data["spec"] = json.loads(row["spec"])
    data["bundle"] = {"sha256": row["bundle_sha256"], "bytes": row["bundle_bytes"]}
    data["links"] = {
        "self": self_url,
        "state": f"{self_url}/state",
        "log": f"{self_url}/log",
        "results": f"{self_url}/results",
        "results_files": f"{self_url}/results/files",
    }
    extra = extra_fields(row, self_url)
    data["links"].update(extra.pop("links_extra"))
    data.update(extra)
    return data
