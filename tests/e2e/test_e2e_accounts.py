"""End to end in Chromium: signing in and out, what another user can see (jobs, sweeps,
receipts, usage, tokens), the Account page's tokens (made, used, revoked: 401), wrong
passwords rate limited on the sign-in page, and the attacks of issue 9 — a page on another
origin posting to labq with the victim's cookie, and a page framing labq."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from e2e_helpers import new_context, sign_in
from helpers import free_port, make_zip, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LONG = {"code.py": "import time\nfor _ in range(900):\n    time.sleep(0.1)\n"}


def expect(target):  # noqa: ANN001, ANN201 - imported lazily like test_e2e_pages
    from playwright.sync_api import expect as _expect

    return _expect(target)


class AttackSite:
    """A web site on another port of 127.0.0.1 (another origin, same host name)."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.port = free_port()
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = pages.get(self.path, "not found").encode()
                self.send_response(200 if self.path in pages else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def attacker() -> Iterator[AttackSite]:
    site = AttackSite()
    site.thread.start()
    try:
        yield site
    finally:
        site.server.shutdown()
        site.server.server_close()


@pytest.fixture(scope="module")
def bob(system) -> dict:  # noqa: ANN001
    token = system.add_user("bob", password="bob-password")
    return {"name": "bob", "password": "bob-password", "http": system.session_for(token)}


def test_sign_in_and_out(browser, system, admin_password) -> None:  # noqa: ANN001
    ctx = new_context(browser, system)
    try:
        page = ctx.new_page()
        page.goto("/results")
        expect(page).to_have_url(re.compile(r"/login\?next=/results$"))
        page.fill("#login-name", "admin")
        page.fill("#login-password", "not-the-password")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_contain_text("wrong user name or password")
        page.fill("#login-password", admin_password)
        page.click("#login-submit")
        expect(page).to_have_url(re.compile(r"/results$"))
        expect(page.locator("#whoami-name")).to_have_text("admin")
        page.click("#sign-out")
        expect(page).to_have_url(re.compile(r"/login$"))
        page.goto("/")
        expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    finally:
        ctx.close()


def test_another_users_job_is_invisible_on_every_page(browser, system, bob,  # noqa: ANN001
                                                      admin_password) -> None:
    admins = system.submit(LONG)
    bobs = bob["http"].post(system.api("/api/v1/jobs"), timeout=30,
                            files={"bundle": ("bob-job.zip", make_zip(LONG, root="bob-job"))})
    assert bobs.status_code == 201
    bobs = bobs.json()
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, bob["name"], bob["password"])
        page = ctx.new_page()
        page.goto("/results")
        expect(page.locator(f'tr[data-job-id="{bobs["id"]}"]')).to_be_visible()
        expect(page.locator(f'tr[data-job-id="{admins["id"]}"]')).to_have_count(0)
        expect(page.locator("th", has_text="Owner")).to_have_count(0)  # not an admin
        page.goto("/")
        expect(page.locator(f'#recent tr[data-job-id="{bobs["id"]}"]')).to_be_visible()
        expect(page.locator(f'tr[data-job-id="{admins["id"]}"]')).to_have_count(0)
        page.goto(f"/jobs/{admins['id']}")
        expect(page.locator("#notice")).to_contain_text(f"There is no job with id {admins['id']}")
        for path in ("", "/log", "/results", "/results/files", "/state"):
            status = page.evaluate(
                "async (u) => (await fetch(u)).status", f"/api/v1/jobs/{admins['id']}{path}")
            assert status == 404, path
        # Bob's own controls work through his session (the pages send the CSRF header)
        page.goto(f"/jobs/{bobs['id']}")
        expect(page.locator("#details")).to_contain_text("bob")
        page.locator('#job-controls button[data-action="stopped"]').click()
        expect(page.locator("#job-state .badge")).to_have_text("stopped", timeout=30_000)
    finally:
        ctx.close()
        system.set_state(admins["id"], "stopped")
    # The admin sees both, with their owners
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, "admin", admin_password)
        page = ctx.new_page()
        page.goto("/results")
        row = page.locator(f'tr[data-job-id="{bobs["id"]}"]')
        expect(row.locator(".cell-owner")).to_have_text("bob")
        expect(page.locator(f'tr[data-job-id="{admins["id"]}"] .cell-owner')).to_have_text(
            "admin")
    finally:
        ctx.close()


# The page an attacker serves from another origin (another port of 127.0.0.1: the same
# *site*, so the victim's SameSite=Lax cookie goes along). It sends everything a browser
# sends cross-site without a CORS preflight: form posts (urlencoded, multipart with a file,
# text/plain carrying JSON) and no-cors fetches with simple content types, to every route
# that changes something. Each returns "sent:opaque"/"submitted" (it left the browser) or
# "blocked" (the browser refused to send it).
ATTACK = """<!doctype html><title>free cat pictures</title><body><script>
const ZIP = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
const bundle = (name) => new File([ZIP], name, {type: "application/zip"});
function multipart(name) { const d = new FormData(); d.append("bundle", bundle(name)); return d; }
function post(url, body) {
  return fetch(url, {method: "POST", mode: "no-cors", credentials: "include", body})
    .then((r) => "sent:" + r.type, () => "blocked");
}
function formPost(url, enctype, fields, file) {
  const sink = document.createElement("iframe");
  sink.name = "sink" + document.querySelectorAll("iframe").length;
  document.body.append(sink);
  const form = document.createElement("form");
  Object.assign(form, {method: "POST", action: url, enctype: enctype, target: sink.name});
  for (const [name, value] of Object.entries(fields)) {
    form.append(Object.assign(document.createElement("input"), {name, value}));
  }
  if (file) {
    const input = Object.assign(document.createElement("input"), {type: "file", name: "bundle"});
    const files = new DataTransfer();
    files.items.add(file);
    input.files = files.files;
    form.append(input);
  }
  document.body.append(form);
  form.submit();
  return "submitted";
}
const JSONISH = {'{"args": ["--pwned"], "x": "': '"}'};  // text/plain form = JSON body
window.attack = async function (api, jobId) {
  const rerun = api + "/api/v1/jobs/" + jobId + "/rerun";
  const out = [];
  for (const url of [api + "/api/v1/jobs", api + "/simulation"]) {
    out.push(await post(url, multipart("evil.zip")));
    out.push(formPost(url, "multipart/form-data", {name: "evil"}, bundle("evil.zip")));
  }
  out.push(await post(rerun, null));
  out.push(await post(rerun, '{"args": ["--pwned"]}'));
  out.push(formPost(rerun, "application/x-www-form-urlencoded", {args: "--pwned"}));
  out.push(formPost(rerun, "text/plain", JSONISH));
  out.push(await post(api + "/api/v1/tokens", new URLSearchParams({name: "evil"})));
  out.push(await post(api + "/api/v1/tokens", '{"name": "evil"}'));
  out.push(formPost(api + "/api/v1/tokens", "multipart/form-data", {name: "evil"}));
  // Stopping needs PUT: the browser first asks labq (a CORS preflight), labq allows nothing.
  out.push(await fetch(api + "/api/v1/jobs/" + jobId + "/state", {method: "PUT",
      credentials: "include", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({state: "stopped"})}).then(() => "sent", () => "blocked"));
  // Last: signing the victim out, or into the attacker's own account (login CSRF).
  out.push(formPost(api + "/login", "application/x-www-form-urlencoded",
                    {name: "mallory", password: "mallory-password"}));
  out.push(await post(api + "/login", '{"name": "mallory", "password": "mallory-password"}'));
  out.push(await post(api + "/logout", null));
  out.push(formPost(api + "/logout", "application/x-www-form-urlencoded", {}));
  return out;
};
</script></body>"""
#: (method, path) of every request above that reaches labq (the PUT never leaves the browser).
ATTACKED = [("POST", "/api/v1/jobs")] * 2 + [("POST", "/simulation")] * 2 + \
    [("POST", "/api/v1/jobs/{id}/rerun")] * 4 + [("POST", "/api/v1/tokens")] * 3 + \
    [("POST", "/login")] * 2 + [("POST", "/logout")] * 2


def _labq_responses(ctx, system) -> list[tuple[str, str, int]]:  # noqa: ANN001
    """Every response labq sends this browser context: (method, path, status). (Chromium
    keeps no body of an opaque or refused-in-a-frame answer, so the status is what is seen:
    a 403 is labq's refusal, ForbiddenError; done, these would be 201, 200 or 204.)"""
    seen: list[tuple[str, str, int]] = []
    ctx.on("response", lambda resp: seen.append(
        (resp.request.method, urlsplit(resp.url).path, resp.status))
        if resp.url.startswith(system.url + "/") else None)
    return seen


def test_a_cross_origin_page_can_neither_start_nor_stop_a_job(browser, system, attacker,  # noqa: ANN001
                                                              admin_password) -> None:
    import base64

    system.add_user("mallory", password="mallory-password")
    victims = system.submit(LONG)
    system.wait_for_state(victims["id"], "started")
    jobs_before = _job_ids(system)
    tokens_before = _token_ids(system)
    attacker.pages["/cats"] = ATTACK % base64.b64encode(
        make_zip({"code.py": "print('pwned')\n"}, root="evil")).decode()
    # The victim is signed in in the same browser ...
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, "admin", admin_password)
        own = ctx.new_page()
        own.goto("/results")
        expect(own.locator("#whoami-name")).to_have_text("admin")
        # ... and opens the attacker's page, which fires its requests at labq
        seen = _labq_responses(ctx, system)
        page = ctx.new_page()
        page.goto(attacker.url("/cats"))
        outcome = page.evaluate("([api, id]) => window.attack(api, id)",
                                [system.url, victims["id"]])
        assert "blocked" not in outcome[:11], outcome  # all of these left the browser
        assert outcome[11] == "blocked", outcome  # the PUT: refused by the CORS preflight
        expected = sorted((m, p.format(id=victims["id"])) for m, p in ATTACKED)

        def attacked() -> list[tuple[str, str, int]]:
            page.evaluate("0")  # a round trip: Playwright hands over the events meanwhile
            return [s for s in seen if s[:2] in set(expected)]

        wait_until(lambda: len(attacked()) >= len(expected), timeout=30,
                   message="labq to answer every request of the attack page")
        # labq refused every one of them itself (CSRF and origin checks): 403, not a
        # missing route (405), a body it could not read (400) or no cookie (401)
        answers = attacked()
        assert sorted(a[:2] for a in answers) == expected, answers
        assert [a for a in answers if a[2] != 403] == [], answers
        # The stop a browser will not send without a preflight: had it gone out anyway
        # (the browser's cookie, the attacker's Origin, no CSRF token), labq refuses it too.
        origin = {"Origin": attacker.url("").rstrip("/")}
        put = ctx.request.put(f"/api/v1/jobs/{victims['id']}/state", headers=origin,
                              data={"state": "stopped"})
        assert put.status == 403, put.text()
        revoke = ctx.request.delete(f"/api/v1/tokens/{min(tokens_before)}", headers=origin)
        assert revoke.status == 403, revoke.text()
        # The victim is still signed in, as themselves
        me = own.evaluate("async () => (await fetch('/api/v1/me')).json()")
        assert me["name"] == "admin", me
    finally:
        ctx.close()
    # ... nothing was started or re-run, no token was made or revoked, the job still runs
    assert _job_ids(system) == jobs_before
    assert _token_ids(system) == tokens_before
    assert system.job(victims["id"])["state"] == "started"
    system.set_state(victims["id"], "stopped")


def _job_ids(system) -> set[str]:  # noqa: ANN001
    resp = system.http.get(system.api("/api/v1/jobs?limit=500"), timeout=10)
    return {j["id"] for j in resp.json()["jobs"]}


def _token_ids(system) -> set[int]:  # noqa: ANN001
    return {t["id"] for t in system.http.get(system.api("/api/v1/tokens"),
                                             timeout=10).json()["tokens"]}


def test_a_framed_page_is_refused(browser, system, attacker, admin_password) -> None:  # noqa: ANN001
    attacker.pages["/frame"] = (f'<!doctype html><iframe id="f" src="{system.url}/results" '
                                'width="800" height="600"></iframe>')
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, "admin", admin_password)
        page = ctx.new_page()
        with page.expect_response(re.compile(r"/results$")) as framed:
            page.goto(attacker.url("/frame"))
        assert framed.value.headers["x-frame-options"] == "DENY"
        page.wait_for_load_state("load")
        frame = page.frames[1]
        # Chromium replaced the refused document with its error page: no labq inside.
        assert frame.url.startswith("chrome-error://"), frame.url
        assert frame.locator(".site-nav").count() == 0
    finally:
        ctx.close()


STATUS = "async ([url, init]) => (await fetch(url, init || {})).status"


def test_account_page_makes_a_token_that_works_and_revokes_it(browser, system, bob) -> None:  # noqa: ANN001
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, bob["name"], bob["password"])
        page = ctx.new_page()
        page.goto("/account")
        expect(page.locator("#account-name")).to_have_text("bob")
        page.fill("#token-name", "e2e-laptop")
        page.click("#token-create")
        expect(page.locator("#token-created")).to_be_visible()
        token = page.locator("#new-token").inner_text().strip()
        assert token.startswith("labq_"), token
        # The copy-paste snippet names this server and this token
        assert page.locator("#token-snippet").inner_text().splitlines() == [
            f"export LABQ_URL={system.url}", f"export LABQ_TOKEN={token}", "labq whoami",
            "labq submit my-experiment/ --wait"]
        row = page.locator("#tokens tbody tr", has_text="e2e-laptop")
        expect(row).to_have_count(1)
        # The token works for the API, and for the CLI the snippet runs
        bearer = {"headers": {"Authorization": f"Bearer {token}"}}
        assert page.evaluate(STATUS, ["/api/v1/me", bearer]) == 200
        whoami = system.labq("whoami", env={"LABQ_TOKEN": token, "LABQ_URL": system.url})
        assert whoami.returncode == 0 and "bob" in whoami.stdout, whoami
        # Revoked on the page, it gets 401 at once, in the browser and anywhere else
        row.locator("button", has_text="Revoke").click()
        expect(row).to_have_count(0)
        assert page.evaluate(STATUS, ["/api/v1/me", bearer]) == 401
        answer = page.evaluate("""async (t) => {
            const r = await fetch("/api/v1/jobs", {headers: {Authorization: "Bearer " + t}});
            return [r.status, r.headers.get("WWW-Authenticate"), (await r.json()).error.code];
        }""", token)
        assert answer == [401, 'Bearer realm="labq"', "unauthorized"], answer
        # The page's own session is not that token: it still works
        assert page.evaluate(STATUS, ["/api/v1/me"]) == 200
    finally:
        ctx.close()


SWEEP = {"code.py": "import os, time\ntime.sleep(1.5)\n"
                    "open('output/seed.txt', 'w').write(os.environ['seed'])\n",
         "labq.toml": "[sweep]\nseed = [1, 2]\n"}


def test_another_users_sweep_receipt_usage_and_tokens_are_invisible(browser, system,  # noqa: ANN001
                                                                     bob) -> None:
    first = system.submit(SWEEP, root="admin-sweep")
    group_id = first["group_id"]
    members = system.http.get(system.api(f"/api/v1/groups/{group_id}"), timeout=10).json()
    for member in members["jobs"]:
        system.wait_done(member["id"])
    job_id = first["id"]
    routes = [f"/api/v1/groups/{group_id}", f"/api/v1/groups/{group_id}/results",
              f"/api/v1/jobs/{job_id}/receipt", f"/api/v1/jobs/{job_id}/usage"]
    # Every route answers its owner (so a 404 below is the scope, not a missing route) ...
    for path in routes:
        assert system.http.get(system.api(path), timeout=10).status_code == 200, path
    admin_tokens = {t["id"] for t in system.http.get(system.api("/api/v1/tokens"),
                                                     timeout=10).json()["tokens"]}
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, bob["name"], bob["password"])
        page = ctx.new_page()
        # ... but not bob: the group page says there is no such sweep
        page.goto(f"/groups/{group_id}")
        expect(page.locator("#notice")).to_contain_text(f"There is no sweep with id {group_id}")
        expect(page.locator("#group-wrap tbody tr")).to_have_count(0)
        expect(page.locator("#group-download")).to_be_hidden()
        for path in routes:
            assert page.evaluate(STATUS, [path]) == 404, path
        csrf = page.evaluate("window.labq.me.csrf_token")
        rerun = {"method": "POST", "headers": {"X-CSRF-Token": csrf}}
        assert page.evaluate(STATUS, [f"/api/v1/jobs/{job_id}/rerun", rerun]) == 404
        # The account page lists bob's own tokens only
        page.goto("/account")
        expect(page.locator("#account-name")).to_have_text("bob")
        page.wait_for_function("document.querySelector('#tokens tbody tr') !== null")
        shown = {int(i) for i in page.locator("#tokens tbody tr").evaluate_all(
            "(rows) => rows.map((r) => r.dataset.tokenId)")}
        bobs = ctx.request.get("/api/v1/tokens").json()["tokens"]
        assert shown == {t["id"] for t in bobs} and not shown & admin_tokens, shown
    finally:
        ctx.close()


def test_wrong_passwords_are_rate_limited_on_the_login_page(browser, system) -> None:  # noqa: ANN001
    system.add_user("e2e-carol", password="carol-password")
    ctx = new_context(browser, system)
    try:
        page = ctx.new_page()
        page.goto("/login")

        def try_password(password: str) -> int:
            page.fill("#login-name", "e2e-carol")
            page.fill("#login-password", password)
            with page.expect_response(lambda r: r.url.endswith("/login")
                                      and r.request.method == "POST") as answer:
                page.click("#login-submit")
            return answer.value.status

        for _ in range(5):
            assert try_password("not-it") == 401
            expect(page.locator("#login-error")).to_have_text("wrong user name or password")
        assert try_password("not-it") == 429
        error = page.locator("#login-error")
        expect(error).to_contain_text("too many wrong passwords for 'e2e-carol'")
        expect(error).to_contain_text("try again in")
        # ... even with the right password, until the minute has passed
        assert try_password("carol-password") == 429
        expect(error).to_contain_text("too many wrong passwords")
        expect(page).to_have_url(re.compile(r"/login$"))
    finally:
        ctx.close()
