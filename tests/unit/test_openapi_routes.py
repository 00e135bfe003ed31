"""The OpenAPI document against the Flask routes: every route under /api/v1 and
/simulation is documented with exactly the methods it answers, nothing is documented
that does not exist, and each operation's security and shared answers agree with the
authentication hook (backend/auth.py). The live check of what each route answers is
tests/integration/test_openapi_contract.py (schemathesis)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from labq.backend import auth
from labq.backend.app import create_app
from labq.backend.openapi import METHODS, build_spec
from labq.shared.settings import Settings

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"
AUTOMATIC = {"HEAD", "OPTIONS"}
#: Documented routes outside /api/v1 and /simulation (the pages are not API).
OTHER_DOCUMENTED = {"/login", "/logout", "/healthz", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), prefix="unitoas",
                        rabbitmq_url=NO_BROKER, max_timeout_s=100, max_memory_mb=512)
    app = create_app(settings)
    yield app
    app.extensions["labq"].shutdown()


@pytest.fixture(scope="module")
def spec(app) -> dict[str, Any]:
    return app.test_client().get("/api/v1/openapi.json").get_json()


def shape(path: str) -> str:
    """``/api/v1/jobs/<job_id>`` and ``/api/v1/jobs/{id}`` are the same route."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


def documented_rule(path: str) -> bool:
    return path.startswith(("/api/v1/", "/simulation")) or path in OTHER_DOCUMENTED


def routes(app) -> dict[tuple[str, str], str]:
    """(route shape, METHOD) -> Flask endpoint, for every documented-kind rule."""
    found = {}
    for rule in app.url_map.iter_rules():
        if documented_rule(rule.rule):
            for method in rule.methods - AUTOMATIC:
                found[(shape(rule.rule), method)] = rule.endpoint
    return found


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(shape(path), method.upper()): op for path, item in spec["paths"].items()
            for method, op in item.items() if method in METHODS}


def test_every_route_is_documented_with_the_methods_it_answers(app, spec):
    missing = sorted(set(routes(app)) - set(operations(spec)))
    assert not missing, f"routes the document does not describe: {missing}"


def test_nothing_is_documented_that_does_not_exist(app, spec):
    served = {(shape(r.rule), m) for r in app.url_map.iter_rules()
              for m in r.methods - AUTOMATIC}
    invented = sorted(set(operations(spec)) - served)
    assert not invented, f"documented but not served: {invented}"


def test_path_parameters_are_declared(spec):
    for path, item in spec["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path, declared)
            assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")


def test_security_matches_the_authentication_hook(app, spec):
    for key, endpoint in routes(app).items():
        op = operations(spec)[key]
        security = op.get("security", spec["security"])
        public = endpoint in auth.PUBLIC_ENDPOINTS
        assert (security == []) is public, (key, endpoint, security)
        # Only the sign-in among the public routes says 401 (a wrong password).
        assert ("401" in op["responses"]) is (not public or endpoint == "account.login"), key
        if endpoint in auth.ADMIN_ENDPOINTS:
            assert "403" in op["responses"], key
        if key[1] not in auth.SAFE_METHODS and not public:
            # The session cookie alone never changes anything: it needs the CSRF token.
            assert all("csrf" in s for s in security if "session" in s), key
            assert "403" in op["responses"], key
        if endpoint in auth.BASIC_ENDPOINTS:
            assert {"basic": []} in security, key


def test_every_operation_states_its_shared_answers(spec):
    for (path, method), op in operations(spec).items():
        answers = op["responses"]
        assert "400" in answers, (method, path)  # the Host check, at least
        if "requestBody" in op:
            assert "413" in answers, (method, path)
        for code, answer in answers.items():
            if code.startswith(("4", "5")):
                assert answer.get("$ref", "").startswith("#/components/responses/E"), \
                    (method, path, code)


def test_every_reference_resolves(spec):
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            target = node.get("$ref") or node.get("operationRef")
            if isinstance(target, str):
                resolved: Any = spec
                for part in target.removeprefix("#/").split("/"):
                    resolved = resolved[part.replace("~1", "/").replace("~0", "~")]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)


def test_the_document_states_this_servers_limits(spec):
    form = spec["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"][
        "multipart/form-data"]
    assert form["schema"]["properties"]["timeout_s"]["maximum"] == 100
    assert form["schema"]["properties"]["memory_mb"]["maximum"] == 512
    assert form["encoding"]["bundle"]["contentType"] == "application/zip"
    assert spec == build_spec(Settings(data_dir=Path("unused"), max_timeout_s=100,
                                       max_memory_mb=512))


def test_schemathesis_can_load_the_document(spec):
    schemathesis = pytest.importorskip("schemathesis")
    loaded = schemathesis.openapi.from_dict(spec)
    labels = {op.ok().label for op in loaded.get_all_operations()}
    assert "POST /api/v1/jobs" in labels and "GET /simulation/{id}/state" in labels
    assert len(labels) == len(operations(spec))
