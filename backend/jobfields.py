"""The job JSON's researcher fields: durations, peak memory and CPU, sweep and rerun links.

Kept apart from the registry so the base JSON (``registry.job_to_json``) stays about the
lifecycle; :func:`extra_fields` is merged into it.
"""

from __future__ import annotations

from typing import Any

from labq.shared.durations import durations
from labq.shared.storage import Storage


def extra_fields(row: dict[str, Any], self_url: str) -> dict[str, Any]:
    group = row.get("group_id")
    return {
        "durations": durations(row),
        "peak_rss_mb": row.get("peak_rss_mb"),
        "cpu_s": row.get("cpu_s"),
        "group_id": group,
        "rerun_of": row.get("rerun_of"),
        "notify_url": row.get("notify_url"),
        "links_extra": {
            "receipt": f"{self_url}/receipt",
            "rerun": f"{self_url}/rerun",
            **({"group": f"/api/v1/groups/{group}"} if group else {}),
        },
    }


def has_results(storage: Storage, row: dict[str, Any]) -> bool:
    """True when the job left at least one result file (an empty output/ is nothing)."""
    if row["state"] != "stopped":
        return False
    return storage.has_results(row["id"], settled=True)


def jobs_json(svc: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full job JSON of ``rows``: lifecycle, waiting fields (one broker call at most)
    and whether there are results to download."""
    from labq.backend.registry import job_to_json
    from labq.backend.waiting import WAITING, idle_workers, waiting_fields

    waiting = any(r["state"] in WAITING for r in rows)
    idle = idle_workers(svc.publisher) if waiting else None
    fields = waiting_fields(svc.engine, rows, idle)
    return [{**job_to_json(r), **fields[r["id"]], "has_results": has_results(svc.storage, r)}
            for r in rows]
