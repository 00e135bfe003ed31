"""The Flask application factory."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request

from backend.errors import register_error_handlers
from backend.openapi import build_spec
from backend.services import Services
from backend.uploads import LabqRequest, cleanup_uploads
from backend.views import events, health, jobs, logs, nrp, pages, results
from shared.settings import Settings

log = logging.getLogger(__name__)

#: Room for multipart framing and form fields on top of the bundle itself.
FORM_OVERHEAD_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None, start_background: bool = False) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__, static_folder=None)
    app.request_class = LabqRequest
    app.json.sort_keys = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    svc = Services.build(settings)
    app.extensions["labq"] = svc
    for blueprint in (jobs.bp, logs.bp, results.bp, events.bp, health.bp, nrp.bp, pages.bp):
        app.register_blueprint(blueprint)
    spec = build_spec()

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    @app.teardown_request
    def _cleanup(_exc: BaseException | None) -> None:
        cleanup_uploads(request.environ)

    register_error_handlers(app)
    if start_background:
        svc.start_background()
    return app
