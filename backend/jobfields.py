"""The job JSON's researcher fields: durations, peak memory and CPU, sweep and rerun links.

Kept apart from the registry so the base JSON (``registry.job_to_json``) stays about the
lifecycle; :func:`extra_fields` is merged into it.
"""

from __future__ import annotations

from typing import Any

from labq.shared.durations import durations
from labq.shared.lifecycle import TERMINAL
from labq.shared.lru import Lru
from labq.shared.storage import Storage

_ENDED = frozenset(str(s) for s in TERMINAL)


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


class JobJsonMemo(Lru[tuple[Any, ...], dict[str, Any]]):
    """The parts of jobs' JSON that only their row decides, made once per backend
    process and kept (least recently used out past ``size``).

    That is all of it but the durations of a job that has not ended (they run with the
    clock) and the place in the queue of a waiting one (it moves as others leave): those
    are put in fresh on every answer. An ended job's results were stored before it
    ended, so whether it has any is known for good too. The key is the whole row as
    read, so any change to it (a column written by anyone, an admin's fix by hand) is
    another key: what is served is always what the row says now. A long history's
    lists show the same jobs to every client again and again; making their JSON was
    most of a list's CPU.
    """

    def __init__(self, size: int = 8192) -> None:
        super().__init__(size)


#: The waiting fields of a job that is not waiting (held jobs get their reason).
_NOT_WAITING = {"queue_position": None, "estimated_start_at": None, "waiting_reason": None}


def _fixed_json(svc: Any, row: dict[str, Any]) -> dict[str, Any]:
    """Everything of the job JSON that the row alone decides (see JobJsonMemo)."""
    from labq.backend.registry import job_to_json

    return {**job_to_json(row), **_NOT_WAITING, "has_results": has_results(svc.storage, row)}


def jobs_json(svc: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full job JSON of ``rows``: lifecycle, waiting fields (one broker call at most)
    and whether there are results to download. Each is a new dict (a caller may change
    it); the nested ones are shared with the memo: do not change those."""
    from labq.backend.waiting import WAITING, idle_workers, waiting_fields

    memo: JobJsonMemo = svc.job_json
    live = [r for r in rows if r["state"] not in _ENDED]
    fields: dict[str, dict[str, Any]] = {}
    if live:
        waiting = any(r["state"] in WAITING for r in live)
        idle = idle_workers(svc.publisher) if waiting else None
        fields = waiting_fields(svc.engine, live, idle)
    out = []
    for row in rows:
        key = tuple(row.values())
        fixed = memo.get(key)
        if fixed is None:
            fixed = _fixed_json(svc, row)
            memo.put(key, fixed)
        data = dict(fixed)  # keys keep their places: the JSON reads as it always did
        if row["state"] not in _ENDED:
            data["durations"] = durations(row)
            data.update(fields[row["id"]])
        out.append(data)
    return out
