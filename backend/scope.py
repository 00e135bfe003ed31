"""Owner scope: the one place that decides which jobs the caller may see and steer.

Every view that takes a job id goes through :func:`visible_job`; every listing, count
and event stream filters with :func:`owner_filter`. A job of another user is answered
exactly like a job that does not exist (404, same message), so ids are not revealed.
Admins see and steer every job, and may narrow lists with ``?owner=NAME``.
"""

from __future__ import annotations

from typing import Any

from flask import request

from labq.backend.auth import current_identity
from labq.backend.services import services
from labq.shared.errors import NotFoundError


def may_see(job: dict[str, Any]) -> bool:
    identity = current_identity()
    return identity.is_admin or job.get("owner") == identity.name


def visible_job(job_id: str) -> dict[str, Any]:
    """The job if the caller may see it; otherwise the same 404 as an unknown id."""
    job = services().registry.get(job_id)
    if not may_see(job):
        raise NotFoundError(f"there is no job {job_id!r}", job_id=job_id)
    return job


def visible_group(group_id: str) -> list[dict[str, Any]]:
    """A sweep's members if the caller may see them (a sweep is one user's upload)."""
    from labq.backend.groups import group_members

    rows = group_members(services().engine, group_id)
    if not may_see(rows[0]):
        raise NotFoundError(f"there is no group {group_id!r}", group_id=group_id)
    return rows


def owner_filter() -> str | None:
    """The owner to filter on: the caller, or for an admin ``?owner=`` (None: everyone)."""
    identity = current_identity()
    if identity.is_admin:
        return request.args.get("owner") or None
    return identity.name
