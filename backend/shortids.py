"""Short job ids: any unique prefix of at least 6 hex characters names a job.

The tables show 8-character ids; typing those into the API or the CLI should work.
A prefix shared by several jobs is a 409 that lists a few of them, so the caller can
type more characters. Applied to every ``<job_id>`` in an API URL, before the view runs.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, select

from labq.shared import db
from labq.shared.errors import LabqError, NotFoundError
from labq.shared.storage import is_job_id

MIN_PREFIX = 6
_PREFIX = re.compile(rf"^[0-9a-f]{{{MIN_PREFIX},31}}$")


class AmbiguousIdError(LabqError):
    code = "ambiguous_id"
    status = 409


def resolve(engine: Engine, raw: str, owner: str | None = None) -> str:
    """The full id ``raw`` names; NotFoundError or AmbiguousIdError otherwise.

    With ``owner``, only that user's jobs are candidates: a prefix shared with another
    user's job must not answer "ambiguous", which would reveal that the job exists.
    """
    value = (raw or "").strip().lower()
    if is_job_id(value):
        return value
    if not _PREFIX.match(value):
        raise NotFoundError(
            f"there is no job {raw!r}; use the full id or a prefix of at least "
            f"{MIN_PREFIX} characters", job_id=raw)
    with db.read(engine) as conn:
        query = select(db.jobs.c.id).where(db.jobs.c.id.like(f"{value}%"))
        if owner is not None:
            query = query.where(db.jobs.c.owner == owner)
        found = [r[0] for r in conn.execute(query.limit(5))]
    if not found:
        raise NotFoundError(f"there is no job whose id starts with {value!r}", job_id=raw)
    if len(found) > 1:
        raise AmbiguousIdError(
            f"{value!r} is the start of more than one job id ({', '.join(f[:12] for f in found)}"
            f"{', ...' if len(found) == 5 else ''}); type more of it", job_id=raw,
            matches=found)
    return found[0]


def expand_job_id(engine: Engine, endpoint: str | None, values: dict[str, Any] | None,
                  owner: str | None = None) -> None:
    """Rewrite ``job_id`` of API routes to the full id, among ``owner``'s jobs (None: all).

    Runs as a before_request hook after authentication (so the caller is known), editing
    ``request.view_args``, which Flask passes to the view.
    """
    if not values or "job_id" not in values or (endpoint or "").startswith("pages."):
        return
    values["job_id"] = resolve(engine, values["job_id"], owner)
