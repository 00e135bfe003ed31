"""Making jobs beyond a plain upload: sweep groups and reruns; reading a group.

A sweep upload stores one bundle and creates one job per combination of its ``[sweep]``
table, all with the same ``group_id`` (shared/sweep.py). A rerun creates a job from the
bundle of an earlier one, with ``rerun_of`` set so its worker installs the exact packages
recorded for that job (process_unit/envlock.py), and optional overrides of the
arguments, environment and limits, validated like labq.toml.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from sqlalchemy import select

from labq.backend.notify import check_notify_url
from labq.producer import fairshare
from labq.producer.jobs import publish_job
from labq.shared import db, sweep
from labq.shared.bundle import BundleInfo
from labq.shared.errors import BadRequestError, BrokerUnavailableError, NotFoundError
from labq.shared.lifecycle import is_terminal
from labq.shared.manifest import JobSpec, resolve_spec
from labq.shared.settings import MIB
from labq.shared.storage import is_job_id, new_job_id

log = logging.getLogger(__name__)

#: Fields a rerun may override.
RERUN_FIELDS = ("args", "env", "timeout_s", "memory_mb", "cpus", "max_output_mb")


def publish_quietly(svc: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Publish a new job; returns its row as it is now (still ``created`` when the broker
    is away: the outbox relay publishes it once the broker is back)."""
    try:
        return publish_job(svc.engine, svc.publisher, job)
    except BrokerUnavailableError as exc:
        log.warning("job %s stays created for now: %s", job["id"], exc.message)
        return job


def notify_url_of(info: BundleInfo, form_value: str | None, settings: Any) -> str | None:
    raw = (form_value or "").strip() or info.manifest.get("notify_url")
    if raw in (None, ""):
        return None
    return check_notify_url(raw, settings)


def create_sweep(svc: Any, info: BundleInfo, spec: JobSpec, combos: list[dict[str, str]], *,
                 bundle_sha256: str, bundle_bytes: int, notify_url: str | None,
                 idempotency_key: str | None, owner: str | None = None
                 ) -> tuple[list[dict[str, Any]], bool]:
    """One job per combination, one group; returns (members, created_now)."""
    if owner:
        # Refuse a sweep that cannot fit the owner's quota before making any member
        # (each member's own admission still enforces the quota exactly).
        fairshare.check_room(svc.engine, owner, len(combos), svc.settings)
    group_id = new_job_id()
    members = []
    for i, combo in enumerate(combos):
        job, created = svc.registry.create(
            name=sweep.member_name(info.name, combo), spec=sweep.apply(spec, combo),
            bundle_sha256=bundle_sha256, bundle_bytes=bundle_bytes,
            # The key names the whole upload: it is kept on the first member.
            idempotency_key=idempotency_key if i == 0 else None, owner=owner,
            extra={"group_id": group_id, "notify_url": notify_url})
        if not created:  # a replayed upload: the group exists already
            return group_members(svc.engine, job["group_id"]) if job["group_id"] else [job], \
                False
        members.append(job)
    members = [publish_quietly(svc, job) for job in members]
    log.info("group %s: %d jobs of %s", group_id, len(members), info.name)
    return members, True


def rerun_spec(old: dict[str, Any], overrides: Any, settings: Any) -> JobSpec:
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise BadRequestError('send JSON like {"args": ["--lr=0.1"]} (or nothing)')
    unknown = sorted(set(overrides) - set(RERUN_FIELDS))
    if unknown:
        raise BadRequestError(f"a rerun cannot change {', '.join(unknown)}; it may change "
                              f"{', '.join(RERUN_FIELDS)}", field=unknown[0])
    spec = json.loads(old["spec"])
    data = {"args": spec.get("args", []), "env": spec.get("env", {}),
            "timeout_s": spec.get("timeout_s"), "memory_mb": spec.get("memory_mb"),
            "cpus": spec.get("cpus"),
            "max_output_mb": (spec.get("max_output_bytes") or 0) // MIB or None}
    data = {k: v for k, v in data.items() if v not in (None, 0)}
    data.update(overrides)
    return resolve_spec(data, spec["entrypoint"], settings)


def create_rerun(svc: Any, old: dict[str, Any], overrides: Any,
                 owner: str | None = None) -> dict[str, Any]:
    """Re-run ``old`` (a job row the caller may see) as a new job of ``owner``."""
    job_id = old["id"]
    if not svc.storage.has_bundle(old["bundle_sha256"]):
        raise NotFoundError(f"the bundle of job {job_id} is no longer stored; upload it again")
    spec = rerun_spec(old, overrides, svc.settings)
    job, _ = svc.registry.create(
        name=old["name"], spec=spec, bundle_sha256=old["bundle_sha256"],
        bundle_bytes=old["bundle_bytes"], owner=owner,
        extra={"rerun_of": old["id"], "notify_url": old.get("notify_url")})
    job = publish_quietly(svc, job)
    log.info("job %s re-runs %s", job["id"], old["id"])
    return job


def group_members(engine: Any, group_id: str) -> list[dict[str, Any]]:
    if not is_job_id(group_id):
        raise NotFoundError(f"there is no group {group_id!r}", group_id=group_id)
    with db.read(engine) as conn:
        rows = [dict(r) for r in conn.execute(
            select(db.jobs).where(db.jobs.c.group_id == group_id)
            .order_by(db.jobs.c.created_at, db.jobs.c.id)).mappings()]
    if not rows:
        raise NotFoundError(f"there is no group {group_id!r}", group_id=group_id)
    return rows


def group_summary(group_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    base = f"/api/v1/groups/{group_id}"
    return {
        "id": group_id,
        "name": rows[0]["name"].split("[", 1)[0],
        "size": len(rows),
        "done": all(is_terminal(r["state"]) for r in rows),
        "states": dict(Counter(r["state"] for r in rows)),
        "outcomes": dict(Counter(r["outcome"] for r in rows if r["outcome"])),
        "links": {"self": base, "results": f"{base}/results", "page": f"/groups/{group_id}"},
    }
