"""The web pages: the ``frontend`` package's HTML, CSS and JS, served as they are."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Blueprint, Response, send_from_directory
from werkzeug.exceptions import NotFound

bp = Blueprint("pages", __name__)


def frontend_dir() -> Path:
    return Path(str(files("labq.frontend")))


def page(name: str) -> Response:
    resp = send_from_directory(frontend_dir(), name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/")
def home() -> Response:
    return page("index.html")


@bp.get("/upload")
def upload() -> Response:
    return page("upload.html")


@bp.get("/results")
def results() -> Response:
    return page("results.html")


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Response:
    return page("job.html")


@bp.get("/account")
def account() -> Response:
    return page("account.html")


@bp.get("/groups/<group_id>")
def group(group_id: str) -> Response:
    return page("group.html")


@bp.get("/api/docs")
def api_docs() -> Response:
    return page("api.html")


@bp.get("/static/<path:filename>")
def static_file(filename: str) -> Response:
    if filename.endswith(".py") or filename.startswith(("_", ".")):
        raise NotFound()
    return page(filename)
