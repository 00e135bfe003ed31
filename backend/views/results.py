"""``/api/v1/jobs/<id>/results``: the results zip, its file list, and single files.

Results are blobs (shared/blobstore.py) on the volume or in an object store; both are
streamed to the client in small chunks as they are read (:func:`send_blob`), never
loaded whole. On the volume no symbolic link is followed at any level and only regular
files are served; a path must be clean and relative, so a job cannot expose anything
outside its own results.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, send_file

from labq.backend.scope import visible_job
from labq.backend.services import services
from labq.shared.blobstore import Blob
from labq.shared.errors import NotFoundError

bp = Blueprint("results", __name__, url_prefix="/api/v1/jobs")


def _no_results(job: dict) -> NotFoundError:
    return NotFoundError(
        f"job {job['id']} has no results yet (it is {job['state']}); results appear when "
        "the job has stopped", job_id=job["id"], state=job["state"])


def send_blob(blob: Blob, name: str, *, as_attachment: bool,
              mimetype: str | None = None) -> Response:
    """A response that streams ``blob`` (the WSGI server reads a few KB at a time, or
    uses sendfile for a file on the volume) and closes it when done."""
    resp = send_file(blob, mimetype=mimetype, as_attachment=as_attachment,
                     download_name=name, max_age=0, conditional=False)
    resp.content_length = blob.size
    return resp


@bp.get("/<job_id>/results")
def archive(job_id: str) -> Response:
    svc = services()
    job = visible_job(job_id)
    blob = svc.storage.open_results_zip(job_id)
    if blob is None:
        raise _no_results(job)
    return send_blob(blob, f"{job['name']}-{job_id[:8]}-results.zip", as_attachment=True,
                     mimetype="application/zip")


@bp.get("/<job_id>/results/files")
def files(job_id: str) -> Response:
    storage = services().storage
    job = visible_job(job_id)
    if not storage.has_results_zip(job_id):
        raise _no_results(job)
    listing = [{"path": path, "size": blob.size}
               for path, blob in storage.result_files(job_id)]
    return jsonify({"job_id": job_id, "files": listing})


@bp.get("/<job_id>/results/files/<path:subpath>")
def one_file(job_id: str, subpath: str) -> Response:
    visible_job(job_id)
    missing = NotFoundError(f"job {job_id} has no result file {subpath!r}", path=subpath)
    try:
        blob = services().storage.open_result(job_id, subpath)
    except NotFoundError:  # not a clean relative path
        raise missing from None
    if blob is None:
        raise missing
    resp = send_blob(blob, subpath.rsplit("/", 1)[-1], as_attachment=False)
    # Files a job wrote are shown inline (plots, text) but never run as part of labq's
    # origin: an output/report.html must not be able to call the API as the viewer.
    resp.headers["Content-Security-Policy"] = "sandbox"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp
