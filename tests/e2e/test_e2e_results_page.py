"""Issue 11's list and job-page details in Chromium against a real labq (2 workers): Home
counts busy workers, the Results list shows a queued job's place, filters by date and
sorts by run time, offers a download only for jobs that left files; previews are capped
(long text and tables cut, with a note) and show jpg inline; a job that was paused shows
its real run time (pauses left out) on its page and in the list.
"""

from __future__ import annotations

import uuid
from datetime import date, timedelta

import pytest
from helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LIVE = 60_000  # ms
BLOCKER = "import time\nprint('ready', flush=True)\nfor _ in range(1200):\n    time.sleep(0.1)\n"


def expect(target):  # noqa: ANN001, ANN201 - imported lazily like the other e2e modules
    from playwright.sync_api import expect as _expect

    return _expect(target)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


def row_of(page, job_id: str):  # noqa: ANN001, ANN201
    return page.locator(f'#jobs-wrap tr[data-job-id="{job_id}"]')


def test_home_counts_busy_workers_and_results_shows_the_queue_place(context, system) -> None:  # noqa: ANN001
    busy = [system.submit({"code.py": BLOCKER}, root=unique("e2e-busy"))["id"] for _ in range(2)]
    queued = None
    try:
        for job_id in busy:
            system.wait_for_state(job_id, "started")
        page = context.new_page()
        page.goto("/")
        # Both workers run a job: both are counted (not just idle ones, nor twice)
        expect(page.locator("#stat-workers")).to_have_text("2", timeout=LIVE)
        queued = system.submit({"code.py": "print(1)\n"}, root=unique("e2e-queued"))["id"]
        system.wait_for_state(queued, "queued")
        results = context.new_page()
        results.goto("/results")
        place = row_of(results, queued).locator(".queue-pos")
        expect(place).to_have_text("#1", timeout=LIVE)
        expect(place).to_have_attribute("title", "0 jobs ahead, 2 workers busy")
        expect(row_of(results, busy[0]).locator(".queue-pos")).to_have_count(0)
    finally:
        for job_id in [*busy, queued]:
            if job_id:
                system.set_state(job_id, "stopped")
        for job_id in [*busy, queued]:
            if job_id:
                system.wait_done(job_id)
    expect(row_of(results, queued).locator(".queue-pos")).to_have_count(0, timeout=LIVE)


def test_results_filter_by_date_sort_by_run_time_and_no_empty_download(context,  # noqa: ANN001
                                                                        system) -> None:
    tag = uuid.uuid4().hex[:8]
    short = system.submit({"code.py": "open('output/r.txt', 'w').write('r')\n"},
                          root=f"e2e-short-{tag}")["id"]
    system.wait_done(short)
    long = system.submit({"code.py": "import time\ntime.sleep(2.5)\n"},
                         root=f"e2e-long-{tag}")["id"]
    done = system.wait_done(long)
    assert system.job(short)["durations"]["run_s"] < done["durations"]["run_s"]
    page = context.new_page()
    page.goto("/results")
    page.fill("#filter-name", tag)
    page.press("#filter-name", "Enter")
    rows = page.locator("#jobs-wrap tbody tr")
    expect(rows).to_have_count(2)

    def order() -> list[str]:
        return rows.evaluate_all("(rs) => rs.map((r) => r.dataset.jobId)")

    page.select_option("#filter-sort", "-duration")
    expect(rows.first).to_have_attribute("data-job-id", long)
    assert order() == [long, short] and "sort=-duration" in page.url
    page.select_option("#filter-sort", "duration")
    expect(rows.first).to_have_attribute("data-job-id", short)
    assert order() == [short, long]
    # Since a date: the jobs' own day keeps both, the next day none
    day = date.fromisoformat(done["created_at"][:10])
    page.fill("#filter-since", (day + timedelta(days=1)).isoformat())
    expect(page.locator("#jobs-empty")).to_be_visible()
    assert f"since={day + timedelta(days=1)}" in page.url
    page.fill("#filter-since", day.isoformat())
    expect(rows).to_have_count(2)
    # Before a date: the jobs' own day keeps none, the next day both
    page.fill("#filter-until", day.isoformat())
    expect(page.locator("#jobs-empty")).to_be_visible()
    assert f"until={day}" in page.url
    page.fill("#filter-until", (day + timedelta(days=1)).isoformat())
    expect(rows).to_have_count(2)
    # Only the job that left a file offers its results
    expect(row_of(page, short).locator(".row-links a", has_text="Results")).to_have_count(1)
    expect(row_of(page, long).locator(".row-links a", has_text="Log")).to_have_count(1)
    expect(row_of(page, long).locator(".row-links a", has_text="Results")).to_have_count(0)
    job = context.new_page()
    job.goto(f"/jobs/{long}")
    expect(job.locator("#files")).to_contain_text("This job left no files in output/.")
    expect(job.locator("#download-all")).to_be_hidden()


PREVIEWED = r"""
import pathlib, shutil
out = pathlib.Path("output")
(out / "big.txt").write_text("0123456789abcdef" * 6250)       # 100,000 bytes
(out / "big.csv").write_text("step,loss\n" + "".join(f"{i},{1 / (i + 1):.4f}\n"
                                                   for i in range(100)))
shutil.copy("photo.jpg", out / "photo.jpg")
"""


def test_previews_are_capped_and_show_jpg(context, system) -> None:  # noqa: ANN001
    painter = context.new_page()
    painter.set_content('<div style="width:30px;height:20px;background:#c33"></div>'
                        '<style>body{margin:0}</style>')
    jpg = painter.screenshot(type="jpeg", clip={"x": 0, "y": 0, "width": 30, "height": 20})
    painter.close()
    job_id = system.submit({"code.py": PREVIEWED, "photo.jpg": jpg},
                           root=unique("e2e-previews"))["id"]
    assert system.wait_done(job_id)["outcome"] == "succeeded"
    page = context.new_page()
    page.goto(f"/jobs/{job_id}")
    previews = page.locator("#previews")
    text = previews.locator('details[data-path="big.txt"]')
    expect(text.locator("pre")).to_be_visible(timeout=LIVE)
    assert len(text.locator("pre").inner_text()) == 64 * 1024
    expect(text).to_contain_text("First 64 KB of 98 KB.")
    table = previews.locator('details[data-path="big.csv"]')
    expect(table.locator("tbody tr")).to_have_count(20)
    expect(table.locator("th")).to_have_text(["step", "loss"])
    expect(table).to_contain_text("First 20 rows.")
    photo = previews.locator('details[data-path="photo.jpg"] img')
    expect(photo).to_be_visible()
    page.wait_for_function(
        "document.querySelector('details[data-path=\"photo.jpg\"] img').naturalWidth === 30")


TICKS = "import time\nfor i in range(40):\n    print(f'tick {i}', flush=True)\n" \
        "    time.sleep(0.1)\n"


def test_a_paused_job_shows_its_real_run_time(context, system) -> None:  # noqa: ANN001
    job_id = system.submit({"code.py": TICKS}, root=unique("e2e-paused"))["id"]
    # Most of the run happens before the pause: a run time counted from the resume
    # (the bug of issue 11) would be far shorter than the real one.
    wait_until(lambda: "tick 25" in system.log(job_id), timeout=60, message="25 ticks")
    assert system.set_state(job_id, "paused").status_code == 200
    system.wait_for_state(job_id, "paused")
    assert system.set_state(job_id, "started").status_code == 200
    done = system.wait_done(job_id)
    d = done["durations"]
    assert d["run_s"] >= 3.9 and d["paused_s"] > 0, d
    page = context.new_page()
    page.goto(f"/jobs/{job_id}")
    expect(page.locator("#job-state .badge")).to_have_text("stopped")
    shown = page.evaluate("(s) => window.labq.fmtDuration(s)", d["run_s"])
    assert int(shown.rstrip("s")) >= 3, shown
    run_time = page.locator("#details dt", has_text="Run time").locator(
        "xpath=following-sibling::dd[1]")
    expect(run_time).to_have_text(shown)
    expect(page.locator('#stages dd[data-stage="run_s"]')).to_have_text(shown)
    page.goto("/results")
    expect(row_of(page, job_id).locator(".cell-duration")).to_have_text(shown)
