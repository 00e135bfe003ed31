"""End to end in Chromium: signing in and out, what another user can see, and the attacks
of issue 9 — a page on another origin posting to labq with the victim's cookie, and a
page framing labq."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from e2e_helpers import new_context, sign_in
from helpers import free_port, make_zip

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


ATTACK = """<!doctype html><title>free cat pictures</title><script>
window.attack = async function (api, jobId) {
  const data = new FormData();
  const zip = Uint8Array.from(atob("%s"), (c) => c.charCodeAt(0));
  data.append("bundle", new Blob([zip], {type: "application/zip"}), "evil.zip");
  const results = [];
  const tries = [
    () => fetch(api + "/api/v1/jobs", {method: "POST", mode: "no-cors", body: data,
                                       credentials: "include"}),
    () => fetch(api + "/simulation", {method: "POST", mode: "no-cors", body: data,
                                      credentials: "include"}),
    () => fetch(api + "/api/v1/jobs/" + jobId + "/state", {method: "POST", mode: "no-cors",
        credentials: "include", body: JSON.stringify({state: "stopped"})}),
    () => fetch(api + "/api/v1/jobs/" + jobId + "/state", {method: "PUT", mode: "cors",
        credentials: "include", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({state: "stopped"})}),
  ];
  for (const t of tries) {
    try { const r = await t(); results.push("sent:" + r.type); }
    catch (e) { results.push("blocked"); }
  }
  return results;
};
</script>"""


def test_a_cross_origin_page_can_neither_start_nor_stop_a_job(browser, system, attacker,  # noqa: ANN001
                                                              admin_password) -> None:
    import base64

    victims = system.submit(LONG)
    system.wait_for_state(victims["id"], "started")
    before = {j["id"] for j in system.http.get(system.api("/api/v1/jobs?limit=500"),
                                               timeout=10).json()["jobs"]}
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
        page = ctx.new_page()
        page.goto(attacker.url("/cats"))
        outcome = page.evaluate("([api, id]) => window.attack(api, id)",
                                [system.url, victims["id"]])
        # The no-cors requests did leave the browser (with the cookie: same site) ...
        assert outcome[:3] == ["sent:opaque"] * 3, outcome
        assert outcome[3] == "blocked", outcome  # the PUT needs a CORS preflight
    finally:
        ctx.close()
    # ... but nothing was started and the victim's job still runs
    after = {j["id"] for j in system.http.get(system.api("/api/v1/jobs?limit=500"),
                                              timeout=10).json()["jobs"]}
    assert after == before
    assert system.job(victims["id"])["state"] == "started"
    system.set_state(victims["id"], "stopped")


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
