"""Fair share in Chromium (issue 9): with both limits set (one running job, two unfinished
per user) on a labq with two workers, one busy user cannot hold every worker — her extra
job waits off the queue and its page says why, her upload past the quota is refused on
the Upload page, another user's job runs meanwhile, and her held job starts when she stops
the running one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_helpers import new_context, sign_in
from helpers import LabqSystem, make_zip

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LONG = {"code.py": "import time\nprint('ready', flush=True)\nfor _ in range(900):\n"
                   "    time.sleep(0.1)\n"}
QUICK = {"code.py": "print('quick')\n"}
LIVE = 60_000  # ms


def expect(target):  # noqa: ANN001, ANN201 - imported lazily like the other e2e modules
    from playwright.sync_api import expect as _expect

    return _expect(target)


@pytest.fixture(scope="module")
def system(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    """This module's labq: two workers, both fair-share limits set."""
    sys_ = LabqSystem(tmp_path_factory.mktemp("labq-fair-e2e"), workers=2,
                      env={"LABQ_MAX_RUNNING_PER_USER": "1", "LABQ_MAX_QUEUED_PER_USER": "2"})
    try:
        sys_.start()
        yield sys_
    finally:
        sys_.stop()


def test_one_busy_user_cannot_hold_every_worker(browser, system, tmp_path) -> None:  # noqa: ANN001
    alice = system.session_for(system.add_user("alice", password="alice-password"))
    bob = system.session_for(system.add_user("bob"))

    def submit(session, files: dict) -> dict:  # noqa: ANN001
        resp = session.post(system.api("/api/v1/jobs"), timeout=30,
                            files={"bundle": ("b.zip", make_zip(files, root="busy"))})
        assert resp.status_code == 201, resp.text
        return resp.json()

    running, held = submit(alice, LONG), submit(alice, LONG)
    system.wait_for_state(running["id"], "started")
    ctx = new_context(browser, system)
    try:
        sign_in(ctx, system.url, "alice", "alice-password")
        page = ctx.new_page()
        # Her held job's page says it waits for her running-job limit, off the queue
        page.goto(f"/jobs/{held['id']}")
        expect(page.locator("#job-state .badge")).to_have_text("created")
        expect(page.locator("#waiting")).to_be_visible()
        expect(page.locator("#waiting-place")).to_have_text("held: not in the queue yet")
        expect(page.locator("#waiting-reason")).to_contain_text("your running-job limit")
        expect(page.locator("#waiting-reason")).to_contain_text("LABQ_MAX_RUNNING_PER_USER=1")
        expect(page.locator("#waiting-start")).to_have_text(
            "when one of your queued or running jobs ends")
        expect(page.locator("#details")).to_contain_text("it starts when one of yours ends")
        # The Results list shows it with no place in the queue
        results = ctx.new_page()
        results.goto("/results")
        row = results.locator(f'tr[data-job-id="{held["id"]}"]')
        expect(row.locator(".badge")).to_have_text("created")
        expect(row.locator(".queue-pos")).to_have_count(0)
        # A third upload is past her quota: the Upload page says so
        bundle = tmp_path / "third.zip"
        bundle.write_bytes(make_zip(QUICK, root="third"))
        upload = ctx.new_page()
        upload.goto("/upload")
        upload.set_input_files("#bundle", str(bundle))
        upload.click("#submit")
        expect(upload.locator("#upload-error")).to_be_visible()
        expect(upload.locator("#upload-error-text")).to_contain_text(
            "LABQ_MAX_QUEUED_PER_USER=2")
        # Bob's job takes the other worker at once, while hers still waits
        bobs = submit(bob, QUICK)
        assert system.wait_done(bobs["id"])["outcome"] == "succeeded"
        assert system.job(held["id"])["state"] == "created"
        expect(page.locator("#waiting")).to_be_visible()
        # When she stops her running job (on its page), the held one starts
        own = ctx.new_page()
        own.goto(f"/jobs/{running['id']}")
        own.locator('#job-controls button[data-action="stopped"]').click()
        expect(own.locator("#job-state .badge")).to_have_text("stopped", timeout=LIVE)
        expect(page.locator("#job-state .badge")).to_have_text("started", timeout=LIVE)
        expect(page.locator("#waiting")).to_be_hidden()
        expect(row.locator(".badge")).to_have_text("started", timeout=LIVE)
    finally:
        ctx.close()
        for job in (running, held):
            system.set_state(job["id"], "stopped")
        for job in (running, held):
            system.wait_done(job["id"])
