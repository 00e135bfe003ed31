"""Accounts against a real labq: tokens, owner scope on every route, events per user,
CSRF on cookie sessions, the host allow-list, sign-in rate limiting and the CLI."""

from __future__ import annotations

import json
import threading

import pytest
import requests
from helpers import LabqSystem, make_zip, wait_until

from labq.client.sse import iter_sse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

QUICK = {"code.py": "import pathlib\npathlib.Path('output').mkdir(exist_ok=True)\n"
                    "pathlib.Path('output/r.txt').write_text('r')\nprint('done')\n"}


@pytest.fixture(scope="module")
def users(system: LabqSystem) -> dict[str, requests.Session]:
    alice = system.session_for(system.add_user("alice", password="alice-password"))
    bob = system.session_for(system.add_user("bob", password="bob-password"))
    return {"admin": system.http, "alice": alice, "bob": bob}


def submit(system: LabqSystem, session: requests.Session, files: dict | None = None,
           **headers: str) -> requests.Response:
    return session.post(system.api("/api/v1/jobs"), timeout=30, headers=headers,
                        files={"bundle": ("b.zip", make_zip(files or QUICK))})


@pytest.fixture(scope="module")
def alices_job(system: LabqSystem, users: dict[str, requests.Session]) -> dict:
    resp = submit(system, users["alice"])
    assert resp.status_code == 201, resp.text
    job = resp.json()
    system.wait_done(job["id"])
    return job


JOB_ROUTES = ["/api/v1/jobs/{id}", "/api/v1/jobs/{id}/state", "/api/v1/jobs/{id}/log",
              "/api/v1/jobs/{id}/results", "/api/v1/jobs/{id}/results/files",
              "/api/v1/jobs/{id}/results/files/r.txt", "/simulation/{id}",
              "/simulation/{id}/state"]


def test_every_api_route_needs_a_token(system: LabqSystem, alices_job: dict) -> None:
    anonymous = requests.Session()
    paths = ["/api/v1/jobs", "/api/v1/events", "/api/v1/stats", "/api/v1/me", "/simulation",
             "/api/v1/tokens", *(r.format(id=alices_job["id"]) for r in JOB_ROUTES)]
    for path in paths:
        resp = anonymous.get(system.api(path), timeout=10)
        assert resp.status_code == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert resp.json()["error"]["code"] == "unauthorized", path
    assert submit(system, anonymous).status_code == 401
    bad = system.session_for("labq_not-a-real-token")
    assert bad.get(system.api("/api/v1/jobs"), timeout=10).status_code == 401
    # Public: liveness, readiness, the API description, the sign-in page.
    for path in ("/healthz", "/readyz", "/api/v1/openapi.json", "/login"):
        assert anonymous.get(system.api(path), timeout=10).status_code == 200, path
    # Pages send the browser to the sign-in page.
    page = anonymous.get(system.api("/results?state=queued"), timeout=10,
                         allow_redirects=False)
    assert page.status_code == 302
    assert page.headers["Location"] == "/login?next=/results%3Fstate%3Dqueued"


def test_metrics_are_for_admins(system: LabqSystem, users: dict) -> None:
    assert requests.get(system.api("/metrics"), timeout=10).status_code == 401
    assert users["bob"].get(system.api("/metrics"), timeout=10).status_code == 403
    assert "labq_jobs" in users["admin"].get(system.api("/metrics"), timeout=10).text


def test_another_users_job_is_a_404_on_every_route(system: LabqSystem, users: dict,
                                                   alices_job: dict) -> None:
    bob, alice = users["bob"], users["alice"]
    job_id = alices_job["id"]
    for route in JOB_ROUTES:
        path = route.format(id=job_id)
        assert alice.get(system.api(path), timeout=10).status_code == 200, path
        resp = bob.get(system.api(path), timeout=10)
        assert resp.status_code == 404, path
        # ... answered exactly like a job that does not exist
        unknown = bob.get(system.api(route.format(id="f" * 32)), timeout=10)
        assert resp.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
    live = bob.get(system.api(f"/api/v1/jobs/{job_id}/log"), stream=True, timeout=10,
                   headers={"Accept": "text/event-stream"})
    assert live.status_code == 404
    for path in (f"/api/v1/jobs/{job_id}/state", f"/simulation/{job_id}/state"):
        assert bob.put(system.api(path), json={"state": "stopped"},
                       timeout=10).status_code == 404
    # Lists and counts leave it out; a ?owner= filter does not widen a user's view.
    ids = [j["id"] for j in bob.get(system.api("/api/v1/jobs"), timeout=10).json()["jobs"]]
    assert job_id not in ids
    ids = [j["id"] for j in bob.get(system.api("/api/v1/jobs?owner=alice"),
                                    timeout=10).json()["jobs"]]
    assert ids == []
    assert job_id not in [j["id"] for j in bob.get(system.api("/simulation"), timeout=10).json()]
    assert sum(bob.get(system.api("/api/v1/stats"), timeout=10).json()["jobs"].values()) == 0


def test_admins_see_everything_and_filter_by_owner(system: LabqSystem, users: dict,
                                                   alices_job: dict) -> None:
    admin = users["admin"]
    job = admin.get(system.api(f"/api/v1/jobs/{alices_job['id']}"), timeout=10).json()
    assert job["owner"] == "alice"
    only = admin.get(system.api("/api/v1/jobs?owner=alice"), timeout=10).json()["jobs"]
    assert [j["owner"] for j in only] and {j["owner"] for j in only} == {"alice"}
    assert alices_job["id"] in [j["id"] for j in only]


def _read_events(system: LabqSystem, session: requests.Session, seen: list[dict],
                 stop: threading.Event) -> None:
    with session.get(system.api("/api/v1/events"), stream=True, timeout=60,
                     headers={"Last-Event-ID": "0"}) as resp:
        for _event, data, _last_id in iter_sse(resp):
            if data:
                seen.append(json.loads(data))
            if stop.is_set():
                return


def test_the_event_stream_carries_only_the_callers_jobs(system: LabqSystem, users: dict,
                                                        alices_job: dict) -> None:
    # Given bob's stream, read from the very first event
    seen: list[dict] = []
    stop = threading.Event()
    reader = threading.Thread(target=_read_events, args=(system, users["bob"], seen, stop),
                              daemon=True)
    reader.start()
    # When bob runs a job (alice's ran before, and its events are in the history)
    bobs = submit(system, users["bob"]).json()
    system.wait_done(bobs["id"])
    wait_until(lambda: any(e.get("job_id") == bobs["id"] and e.get("state") == "stopped"
                           for e in seen), timeout=30, message="bob's events")
    stop.set()
    # Then he saw his job's events and none of alice's
    job_ids = {e.get("job_id") for e in seen}
    assert bobs["id"] in job_ids and alices_job["id"] not in job_ids


def test_idempotency_keys_are_scoped_per_user(system: LabqSystem, users: dict) -> None:
    first = submit(system, users["alice"], **{"Idempotency-Key": "shared-key"})
    again = submit(system, users["alice"], **{"Idempotency-Key": "shared-key"})
    bobs = submit(system, users["bob"], **{"Idempotency-Key": "shared-key"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]
    assert bobs.json()["owner"] == "bob"


def test_a_revoked_token_gets_401(system: LabqSystem, users: dict) -> None:
    made = users["alice"].post(system.api("/api/v1/tokens"), json={"name": "ci"}, timeout=10)
    assert made.status_code == 201
    token = system.session_for(made.json()["token"])
    me = token.get(system.api("/api/v1/me"), timeout=10).json()
    assert me["name"] == "alice" and me["via"] == "token"
    listed = users["alice"].get(system.api("/api/v1/tokens"), timeout=10).json()["tokens"]
    used = next(t for t in listed if t["id"] == made.json()["id"])
    assert used["last_used_at"] is not None
    # bob cannot revoke alice's token
    assert users["bob"].delete(system.api(f"/api/v1/tokens/{made.json()['id']}"),
                               timeout=10).status_code == 404
    assert users["alice"].delete(system.api(f"/api/v1/tokens/{made.json()['id']}"),
                                 timeout=10).status_code == 204
    assert token.get(system.api("/api/v1/jobs"), timeout=10).status_code == 401


def test_a_disabled_user_is_locked_out(system: LabqSystem) -> None:
    carol = system.session_for(system.add_user("carol", password="carol-password"))
    assert carol.get(system.api("/api/v1/me"), timeout=10).status_code == 200
    assert system.labq("user", "disable", "carol").returncode == 0
    assert carol.get(system.api("/api/v1/me"), timeout=10).status_code == 401
    login = requests.post(system.api("/login"), json={"name": "carol",
                                                      "password": "carol-password"}, timeout=10)
    assert login.status_code == 401


def _browser_session(system: LabqSystem, name: str, password: str) -> tuple[requests.Session,
                                                                              str]:
    browser = requests.Session()
    resp = browser.post(system.api("/login"), json={"name": name, "password": password},
                        timeout=10)
    assert resp.status_code == 200, resp.text
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    return browser, resp.json()["csrf_token"]


def test_cookie_sessions_need_the_csrf_header_to_change_anything(system: LabqSystem,
                                                                 users: dict) -> None:
    browser, csrf = _browser_session(system, "alice", "alice-password")
    # Reading with the cookie works
    assert browser.get(system.api("/api/v1/me"), timeout=10).json()["csrf_token"] == csrf
    # A change without the header (what a cross-site form or no-cors fetch sends) is refused
    before = len(users["alice"].get(system.api("/api/v1/jobs"), timeout=10).json()["jobs"])
    refused = browser.post(system.api("/api/v1/jobs"), timeout=10,
                           files={"bundle": ("b.zip", make_zip(QUICK))})
    assert refused.status_code == 403
    wrong = browser.post(system.api("/api/v1/jobs"), timeout=10,
                         headers={"X-CSRF-Token": "guess"},
                         files={"bundle": ("b.zip", make_zip(QUICK))})
    assert wrong.status_code == 403
    foreign = browser.post(system.api("/api/v1/jobs"), timeout=10,
                           headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
                           files={"bundle": ("b.zip", make_zip(QUICK))})
    assert foreign.status_code == 403
    after = len(users["alice"].get(system.api("/api/v1/jobs"), timeout=10).json()["jobs"])
    assert after == before
    # With it (labq's own pages), it works
    ok = browser.post(system.api("/api/v1/jobs"), timeout=10, headers={"X-CSRF-Token": csrf},
                      files={"bundle": ("b.zip", make_zip(QUICK))})
    assert ok.status_code == 201 and ok.json()["owner"] == "alice"
    # Signing out ends the session
    assert browser.post(system.api("/logout"), headers={"X-CSRF-Token": csrf},
                        timeout=10).status_code == 204
    assert browser.get(system.api("/api/v1/me"), timeout=10).status_code == 401


def test_a_request_answered_after_sign_out_does_not_sign_back_in(system: LabqSystem) -> None:
    # A page's fetches still in flight when its user signs out (the Results page's list,
    # say) were answered with the session cookie set again, so "signed out" came back
    # signed in (seen in the e2e sign-out test under CI).
    system.add_user("frank", password="frank-password")
    browser, csrf = _browser_session(system, "frank", "frank-password")
    cookie = browser.cookies.get("labq_session")
    assert browser.post(system.api("/logout"), headers={"X-CSRF-Token": csrf},
                        timeout=10).status_code == 204
    assert "labq_session" not in browser.cookies
    # The request the page had sent before signing out, with the old cookie, is answered
    # now: it may answer, but it must not hand the session back.
    late = requests.get(system.api("/api/v1/jobs"), cookies={"labq_session": cookie},
                        timeout=10)
    assert late.status_code == 200
    assert "Set-Cookie" not in late.headers, late.headers["Set-Cookie"]


def test_login_needs_json_and_a_same_origin(system: LabqSystem) -> None:
    form = requests.post(system.api("/login"), data={"name": "alice",
                                                     "password": "alice-password"}, timeout=10)
    assert form.status_code == 400
    foreign = requests.post(system.api("/login"), json={"name": "alice",
                                                        "password": "alice-password"},
                            headers={"Origin": "http://evil.example"}, timeout=10)
    assert foreign.status_code == 403


def test_unknown_host_names_are_refused(system: LabqSystem) -> None:
    rebound = requests.get(system.api("/healthz"), headers={"Host": f"evil.example:{system.port}"},
                           timeout=10)
    assert rebound.status_code == 400
    assert "LABQ_ALLOWED_HOSTS" in rebound.json()["error"]["message"]
    assert requests.get(f"http://localhost:{system.port}/healthz", timeout=10).ok


def test_pages_cannot_be_framed(system: LabqSystem) -> None:
    resp = requests.get(system.api("/login"), timeout=10)
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Content-Security-Policy"] == "frame-ancestors 'none'"


def test_wrong_passwords_are_rate_limited(system: LabqSystem) -> None:
    system.add_user("dave", password="dave-password")
    wrong = {"name": "dave", "password": "not-it"}
    for _ in range(5):
        assert requests.post(system.api("/login"), json=wrong, timeout=10).status_code == 401
    limited = requests.post(system.api("/login"), json=wrong, timeout=10)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # ... even the right password, until the window passes
    right = requests.post(system.api("/login"), json={"name": "dave",
                                                      "password": "dave-password"}, timeout=10)
    assert right.status_code == 429
    # `labq login` (Basic on POST /api/v1/tokens) shares the limit
    basic = requests.post(system.api("/api/v1/tokens"), auth=("dave", "dave-password"),
                          timeout=10)
    assert basic.status_code == 429
    # Another user from the same address is not affected
    assert requests.post(system.api("/login"), json={"name": "alice",
                                                     "password": "alice-password"},
                         timeout=10).status_code == 200


def test_cli_login_whoami_tokens_logout(system: LabqSystem) -> None:
    system.add_user("erin", password="erin-password")
    researcher = {"LABQ_DATA_DIR": str(system.tmp / "nowhere")}  # no admin-token to fall back on
    login = system.labq("login", "--user", "erin", input="erin-password\n", env=researcher)
    assert login.returncode == 0, login.stderr
    saved = system.tmp / "config" / "labq" / "tokens.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    who = system.labq("whoami", env=researcher)
    assert who.returncode == 0 and who.stdout.startswith("erin on "), who.stdout
    made = system.labq("token", "create", "laptop", env=researcher)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    listed = system.labq("token", "list", env=researcher).stdout
    assert "laptop" in listed
    token_id = next(line.split()[0] for line in listed.splitlines() if "laptop" in line)
    assert system.labq("token", "revoke", token_id, env=researcher).returncode == 0
    assert system.session_for(token).get(system.api("/api/v1/me"), timeout=10).status_code == 401
    out = system.labq("logout", env=researcher)
    assert out.returncode == 0 and json.loads(saved.read_text()) == {}
    after = system.labq("whoami", env=researcher)
    assert after.returncode == 1 and "labq login" in after.stderr
    wrong = system.labq("login", "--user", "erin", input="bad-password\n", env=researcher)
    assert wrong.returncode == 1 and "wrong user name or password" in wrong.stderr


def test_user_list_shows_accounts(system: LabqSystem, users: dict) -> None:
    listed = system.labq("user", "list")
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["admin"][1] == "yes" and rows["alice"][1] == "no"



def test_sweeps_reruns_receipts_and_search_are_scoped(system: LabqSystem, users: dict,
                                                      alices_job: dict) -> None:
    alice, bob = users["alice"], users["bob"]
    job_id = alices_job["id"]
    for path in (f"/api/v1/jobs/{job_id}/receipt", f"/api/v1/jobs/{job_id}/usage"):
        assert bob.get(system.api(path), timeout=10).status_code == 404, path
    assert bob.post(system.api(f"/api/v1/jobs/{job_id}/rerun"), timeout=10).status_code == 404
    rerun = alice.post(system.api(f"/api/v1/jobs/{job_id}/rerun"), timeout=10)
    assert rerun.status_code == 201 and rerun.json()["owner"] == "alice"
    found = bob.get(system.api("/api/v1/jobs"), params={"q": "proj"}, timeout=10).json()["jobs"]
    assert job_id not in [j["id"] for j in found]
    sweep = submit(system, alice, {**QUICK, "labq.toml": "[sweep]\nseed = [1, 2]\n"})
    assert sweep.status_code == 201, sweep.text
    group_id = sweep.json()["group"]["id"]
    assert alice.get(system.api(f"/api/v1/groups/{group_id}"), timeout=10).status_code == 200
    for path in (f"/api/v1/groups/{group_id}", f"/api/v1/groups/{group_id}/results"):
        assert bob.get(system.api(path), timeout=10).status_code == 404, path
