"""End to end: the web pages driving a real labq (backend + 2 workers) in headless Chromium.

A researcher's path through Upload → Results → job page, a refused upload, and steering a
long job from the Results page, with every state change arriving live (no reloads).
One screenshot per page goes to /tmp/labq-shots/ for a human to look at.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from helpers import make_zip

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LIVE_TIMEOUT = 60_000  # ms: worst case for a job to be picked up and finish


def expect(target):  # noqa: ANN001, ANN201 - imported lazily: the module must import without it
    from playwright.sync_api import expect as _expect

    return _expect(target)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def write_bundle(tmp_path: Path, root: str, files: dict[str, str | bytes]) -> Path:
    path = tmp_path / f"{root}.zip"
    path.write_bytes(make_zip(files, root=root))
    return path


def mark_no_reload(page) -> None:  # noqa: ANN001
    """Set a flag that only survives as long as the page is not reloaded."""
    page.evaluate("window.__labqNoReload = 'still here'")


def assert_not_reloaded(page) -> None:  # noqa: ANN001
    assert page.evaluate("window.__labqNoReload") == "still here", "the page was reloaded"


def job_row(page, job_id: str):  # noqa: ANN001, ANN201
    return page.locator(f'tr[data-job-id="{job_id}"]')


OK_CODE = """\
import pathlib
import time

print("hello from the labq e2e test", flush=True)
print("<b>not bold</b><script>window.__pwned = 1</script>", flush=True)
time.sleep(3)
out = pathlib.Path("output")
out.mkdir(exist_ok=True)
(out / "result.txt").write_text("answer=42\\n")
print("wrote output/result.txt", flush=True)
"""

COUNTER_CODE = """\
import time

for i in range(300):
    print(f"tick {i}", flush=True)
    time.sleep(0.2)
"""


def test_upload_follow_results_and_job_page(context, system, tmp_path, shots) -> None:  # noqa: ANN001
    name = unique("e2e-ok")
    bundle = write_bundle(tmp_path, name, {
        "code.py": OK_CODE,
        "requirements.txt": "# no packages needed\n",
        "output/.keep": "",
    })

    # The Results page is open before the job exists: the new row and its states must
    # arrive without a reload.
    results = context.new_page()
    results.goto("/results")
    expect(results.locator("table.jobs")).to_be_visible()
    mark_no_reload(results)

    upload = context.new_page()
    upload.goto("/upload")
    expect(upload.locator("h1")).to_have_text("Upload a bundle")
    upload.set_input_files("#bundle", str(bundle))
    expect(upload.locator("#chosen")).to_contain_text(bundle.name)
    upload.click("#submit")

    expect(upload.locator("#upload-result")).to_be_visible()
    expect(upload.locator("#progress")).to_have_attribute("value", "100")  # upload progress
    job_id = upload.locator("#new-id").inner_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{6,}", job_id), job_id
    expect(upload.locator("#new-name")).to_have_text(name)
    expect(upload.locator("#new-state .badge")).to_have_text(
        re.compile(r"created|queued|initialized|started|completed|stopped"))
    expect(upload.locator("#new-link")).to_have_attribute("href", f"/jobs/{job_id}")

    row = job_row(results, job_id)
    expect(row).to_be_visible(timeout=20_000)
    expect(row.locator(".cell-name")).to_have_text(name)
    expect(row.locator(".badge")).to_have_text("stopped", timeout=LIVE_TIMEOUT)
    expect(row.locator(".cell-outcome")).to_have_text("succeeded")
    expect(row.locator(".cell-exit")).to_have_text("0")
    expect(row.get_by_role("link", name=re.compile("Download results"))).to_have_attribute(
        "href", f"/api/v1/jobs/{job_id}/results")
    expect(row.locator("button")).to_have_count(0)  # no controls for an ended job
    assert_not_reloaded(results)
    results.screenshot(path=str(shots / "results.png"), full_page=True)

    # The Upload page followed the new job too.
    expect(upload.locator("#new-state .badge")).to_have_text("stopped", timeout=10_000)
    upload.screenshot(path=str(shots / "upload.png"), full_page=True)

    # Job page: details, log, result files.
    row.locator(".cell-name a").click()
    expect(results).to_have_url(re.compile(rf"/jobs/{job_id}$"))
    job = results
    expect(job.locator("#job-name")).to_have_text(name)
    expect(job.locator("#job-state .badge")).to_have_text("stopped")
    expect(job.locator("#details")).to_contain_text(job_id)
    expect(job.locator("#details")).to_contain_text("code.py")
    expect(job.locator("#log")).to_contain_text("hello from the labq e2e test")
    expect(job.locator("#log")).to_contain_text("wrote output/result.txt")
    # Job output is text, never markup.
    expect(job.locator("#log")).to_contain_text("<b>not bold</b><script>")
    expect(job.locator("#log b, #log script")).to_have_count(0)
    assert job.evaluate("window.__pwned") is None
    link = job.locator("#files a", has_text="result.txt")
    expect(link).to_be_visible()
    with job.expect_download() as download_info:
        link.click()
    assert Path(download_info.value.path()).read_text() == "answer=42\n"
    everything = job.locator("#download-all")
    expect(everything).to_be_visible()
    expect(everything).to_have_attribute("href", f"/api/v1/jobs/{job_id}/results")
    resp = system.http.get(system.api(f"/api/v1/jobs/{job_id}/results"), timeout=10)
    assert resp.status_code == 200 and resp.content[:2] == b"PK"
    job.screenshot(path=str(shots / "job.png"), full_page=True)

    # Home: live counts and the recent jobs.
    home = upload
    home.goto("/")
    expect(home.locator("#stat-workers")).to_have_text("2", timeout=15_000)
    expect(home.locator("#stat-messages")).to_have_text(re.compile(r"^\d+$"))
    expect(home.locator('#stat-states li[data-state="stopped"] .count')).to_have_text(
        re.compile(r"^[1-9]\d*$"))
    expect(job_row(home, job_id)).to_be_visible()
    expect(home.get_by_role("link", name="Upload a bundle")).to_have_attribute("href", "/upload")
    home.screenshot(path=str(shots / "home.png"), full_page=True)


def test_bad_upload_shows_the_server_message(page, system, tmp_path, shots) -> None:  # noqa: ANN001
    not_a_zip = tmp_path / "notes.zip"
    not_a_zip.write_bytes(b"these are my notes, not a zip archive\n" * 10)
    no_entrypoint = write_bundle(tmp_path, unique("e2e-noentry"), {"readme.txt": "hi"})

    page.goto("/upload")
    for path in (not_a_zip, no_entrypoint):
        expected = system.http.post(system.api("/api/v1/jobs"),
                                 files={"bundle": (path.name, path.read_bytes())}, timeout=10)
        assert 400 <= expected.status_code < 500, expected.text
        message = expected.json()["error"]["message"]
        assert message

        page.set_input_files("#bundle", str(path))
        page.click("#submit")
        error = page.locator("#upload-error")
        expect(error).to_be_visible()
        expect(page.locator("#upload-error-text")).to_contain_text(message)
        expect(page.locator("#upload-result")).to_be_hidden()
    page.screenshot(path=str(shots / "upload-error.png"), full_page=True)


def test_pause_resume_stop_from_results_page(context, system, shots) -> None:  # noqa: ANN001
    older_id = system.submit({"code.py": "print('an older job')\n"}, root=unique("e2e-older"))["id"]
    name = unique("e2e-counter")
    job_id = system.submit({"code.py": COUNTER_CODE}, root=name)["id"]

    # The job page follows the log live.
    job = context.new_page()
    job.goto(f"/jobs/{job_id}")
    expect(job.locator("#job-name")).to_have_text(name)
    expect(job.locator("#log")).to_contain_text("tick 3", timeout=LIVE_TIMEOUT)
    expect(job.locator("#log")).to_contain_text("tick 8", timeout=10_000)
    expect(job.locator("#job-controls [data-action=paused]")).to_be_visible()
    expect(job.locator("#job-controls [data-action=stopped]")).to_be_visible()
    job.screenshot(path=str(shots / "job-running.png"), full_page=True)
    mark_no_reload(job)

    results = context.new_page()
    results.goto(f"/results?name={name}")
    mark_no_reload(results)
    row = job_row(results, job_id)
    badge = row.locator(".badge")
    expect(badge).to_have_text("started", timeout=LIVE_TIMEOUT)
    expect(row.locator("[data-action=started]")).to_have_count(0)

    row.locator("[data-action=paused]").click()
    expect(badge).to_have_text("paused", timeout=15_000)
    expect(row.locator("[data-action=paused]")).to_have_count(0)
    expect(job.locator("#job-state .badge")).to_have_text("paused", timeout=15_000)
    # Paused means frozen: the live log stops growing (once what was written before the
    # pause, which the log stream polls for every 0.25 s, has arrived).
    job.wait_for_timeout(800)
    frozen = job.locator("#log").inner_text()
    job.wait_for_timeout(1000)
    assert job.locator("#log").inner_text() == frozen
    results.screenshot(path=str(shots / "results-paused.png"), full_page=True)

    row.locator("[data-action=started]").click()
    expect(badge).to_have_text("started", timeout=15_000)
    expect(row.locator("[data-action=paused]")).to_be_visible()

    row.locator("[data-action=stopped]").click()
    expect(badge).to_have_text("stopped", timeout=30_000)
    expect(row.locator(".cell-outcome")).to_have_text("cancelled")
    expect(row.locator("button")).to_have_count(0)
    expect(job.locator("#job-state .badge")).to_have_text("stopped", timeout=15_000)
    expect(job.locator("#log-state")).to_have_text("complete", timeout=15_000)
    assert_not_reloaded(results)
    assert_not_reloaded(job)
    assert system.job(job_id)["outcome"] == "cancelled"

    # Pagination: one job per page, "Older" follows next_cursor, "Newer" comes back.
    results.goto("/results?limit=1")
    first = results.locator("tbody tr")
    expect(first).to_have_count(1)
    expect(first).to_have_attribute("data-job-id", job_id)  # newest first
    expect(results.locator("#page-older")).to_be_enabled()
    results.click("#page-older")
    expect(first).to_have_attribute("data-job-id", older_id)
    expect(results.locator("#page-info")).to_have_text("Page 2")
    results.click("#page-newer")
    expect(first).to_have_attribute("data-job-id", job_id)
