"""NRP-compatible routes: ``/simulation`` maps onto the same jobs and lifecycle."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from labq.backend.registry import job_to_json
from labq.backend.scope import visible_job
from labq.backend.views.jobs import list_jobs, put_state, state_body, submit_job

bp = Blueprint("nrp", __name__, url_prefix="/simulation")


@bp.post("")
def create() -> tuple[Response, int]:
    return submit_job()


@bp.get("")
def index() -> Response:
    jobs, _cursor = list_jobs()
    return jsonify(jobs)  # NRP answers with a plain list


@bp.get("/<job_id>")
def show(job_id: str) -> Response:
    return jsonify(job_to_json(visible_job(job_id)))


@bp.get("/<job_id>/state")
def get_state(job_id: str) -> Response:
    return jsonify(state_body(visible_job(job_id)))


@bp.put("/<job_id>/state")
def set_state(job_id: str) -> Response:
    return jsonify(state_body(put_state(job_id)))
