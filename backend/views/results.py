"""``/api/v1/jobs/<id>/results``: the results zip, its file list, and single files.

Files are served from the unpacked ``results/`` folder without following symbolic
links at any level, and only for clean relative paths, so a job cannot expose
anything outside its own results.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from flask import Blueprint, Response, jsonify, send_file

from labq.backend.scope import visible_job
from labq.backend.services import services
from labq.shared.errors import NotFoundError

bp = Blueprint("results", __name__, url_prefix="/api/v1/jobs")


def _no_results(job: dict) -> NotFoundError:
    return NotFoundError(
        f"job {job['id']} has no results yet (it is {job['state']}); results appear when "
        "the job has stopped", job_id=job["id"], state=job["state"])


@bp.get("/<job_id>/results")
def archive(job_id: str) -> Response:
    svc = services()
    job = visible_job(job_id)
    handle = svc.storage.open_job_file(job_id, svc.storage.results_zip(job_id).name)
    if handle is None:
        raise _no_results(job)
    return send_file(handle, mimetype="application/zip", as_attachment=True,
                     download_name=f"{job['name']}-{job_id[:8]}-results.zip", max_age=0)


def _results_dir(job: dict) -> Path:
    folder = services().storage.results_dir(job["id"])
    if folder.parent.is_symlink() or folder.is_symlink() or not folder.is_dir():
        raise _no_results(job)
    return folder


@bp.get("/<job_id>/results/files")
def files(job_id: str) -> Response:
    job = visible_job(job_id)
    root = _results_dir(job)
    listing = []
    for current, dirs, names in os.walk(root, followlinks=False):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not (here / d).is_symlink())
        for name in sorted(names):
            st = os.lstat(here / name)
            if stat.S_ISREG(st.st_mode):
                listing.append({"path": (here / name).relative_to(root).as_posix(),
                                "size": st.st_size})
    return jsonify({"job_id": job_id, "files": listing})


@bp.get("/<job_id>/results/files/<path:subpath>")
def one_file(job_id: str, subpath: str) -> Response:
    job = visible_job(job_id)
    root = _results_dir(job)
    missing = NotFoundError(f"job {job_id} has no result file {subpath!r}", path=subpath)
    parts = subpath.split("/")
    if (subpath.startswith("/") or "\\" in subpath or "\x00" in subpath
            or any(p in ("", ".", "..") for p in parts)):
        raise missing
    current = root
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except OSError:
            raise missing from None
        if stat.S_ISLNK(st.st_mode):
            raise missing
    if not stat.S_ISREG(st.st_mode):
        raise missing
    try:
        fd = os.open(current, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise missing from None
    handle = os.fdopen(fd, "rb")
    resp = send_file(handle, as_attachment=False, download_name=parts[-1], max_age=0)
    # Files a job wrote are shown inline (plots, text) but never run as part of labq's
    # origin: an output/report.html must not be able to call the API as the viewer.
    resp.headers["Content-Security-Policy"] = "sandbox"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp
