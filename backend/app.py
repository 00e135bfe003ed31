"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import Engine

from labq.backend import auth, jsonio, websecurity
from labq.backend.accounts import ensure_admin
from labq.backend.errors import register_error_handlers
from labq.backend.openapi import build_spec
from labq.backend.params import refuse_nul
from labq.backend.services import Services
from labq.backend.shortids import expand_job_id
from labq.backend.uploads import LabqRequest, cleanup_uploads
from labq.backend.views import (
    account,
    events,
    groups,
    health,
    jobs,
    logs,
    nrp,
    pages,
    receipts,
    results,
)
from labq.shared import db
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

#: Room for multipart framing and form fields on top of the bundle itself.
FORM_OVERHEAD_BYTES = 1024 * 1024


def _share_reads_per_request(app: Flask, engine: Engine) -> None:
    """One read connection per request (shared.db.share_reads): opened by its first
    read, given back when the view is done — before a streamed body (an event or log
    stream) is sent, so an open stream never holds a database connection."""

    @app.before_request
    def _share_reads() -> None:
        g.shared_reads = db.share_reads(engine)

    @app.after_request
    def _give_back(response: Response) -> Response:
        _end_shared_reads()
        return response


def _end_shared_reads() -> None:
    token = g.pop("shared_reads", None)
    if token is not None:
        db.end_shared_reads(token)


def create_app(settings: Settings | None = None, start_background: bool = False) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=None)
    app.request_class = LabqRequest
    jsonio.install(app)  # orjson; keys in insertion order
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    svc = Services.build(settings)
    app.extensions["labq"] = svc
    ensure_admin(svc.engine, settings.data_dir)
    _share_reads_per_request(app, svc.engine)  # first: the caller's token is a read too
    websecurity.install(app, settings)  # host allow-list first, then who is asking
    auth.install(app)
    for blueprint in (jobs.bp, logs.bp, results.bp, events.bp, health.bp, nrp.bp, pages.bp,
                      account.bp):
        app.register_blueprint(blueprint)
    for blueprint in (receipts.bp, groups.bp):
        app.register_blueprint(blueprint)
    spec = build_spec(settings)

    @app.before_request
    def _short_ids() -> None:
        # Registered after auth.install, so the caller is known: a prefix is resolved
        # among the jobs the caller may see (admins: all), never revealing others' ids.
        values = request.view_args
        if values and "job_id" in values and request.endpoint \
                and not request.endpoint.startswith("pages."):
            identity = g.get("identity")
            if identity is not None:
                expand_job_id(svc.engine, request.endpoint, values,
                              None if identity.is_admin else identity.name)

    app.before_request(refuse_nul)  # after the caller is known: see params.py

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    @app.teardown_request
    def _cleanup(_exc: BaseException | None) -> None:
        _end_shared_reads()
        cleanup_uploads(request.environ)

    register_error_handlers(app)
    if start_background:
        svc.start_background()
    return app
