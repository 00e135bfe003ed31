"""The researcher's pages (issue 11) in headless Chromium against a real labq (2 workers).

A queued job says where it stands and why; a running job draws its memory and CPU live;
the browser notifies when a watched job ends; results are previewed inline (images,
tables, text, JSON); "Run again" makes a new job with edited arguments; a sweep has a group
page; an out-of-memory end names the limit and the peak; the Results page searches and
filters; the API page lists the operations. Screenshots of the running job page and of a
sweep's group page go to the shots dir (the README's come from there: docs/img/).
"""

from __future__ import annotations

import uuid

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

LIVE = 60_000  # ms


def expect(target):  # noqa: ANN001, ANN201 - imported lazily: the module must import without it
    from playwright.sync_api import expect as _expect

    return _expect(target)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


# Holds a worker, growing to 40 MB so the chart has a shape, until it is stopped.
BLOCKER = """\
import time
held = []
for i in range(1200):
    if len(held) < 40:
        held.append(bytearray(1024 * 1024))
    sum(range(20000))
    print(f"tick {i}", flush=True)
    time.sleep(0.1)
"""

# Leaves one file of each previewable kind.
RESULTS = r"""
import json, pathlib, struct, sys, zlib
out = pathlib.Path("output")
out.mkdir(exist_ok=True)

def png(w, h):
    raw = b"".join(b"\x00" + bytes([200, 40, 40]) * w for _ in range(h))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

(out / "plot.png").write_bytes(png(40, 20))
(out / "table.csv").write_text('step,loss\n1,0.9\n2,0.5\n3,"0,25"\n')
(out / "metrics.json").write_text(json.dumps({"loss": 0.25, "args": sys.argv[1:]}))
(out / "notes.txt").write_text("<b>not bold</b> all good\n")
(out / "shape.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" '
                               'height="10"><script>parent.__pwned = 1</script>'
                               '<rect width="10" height="10"/></svg>')
print("args", sys.argv[1:], flush=True)
"""

RECORD_NOTIFICATIONS = """
window.__notes = [];
window.Notification = class {
  static get permission() { return "granted"; }
  static requestPermission() { return Promise.resolve("granted"); }
  constructor(title, options) { window.__notes.push({ title, body: options && options.body }); }
  close() {}
};
"""


def test_queue_chart_notification_previews_and_run_again(context, system, shots) -> None:  # noqa: ANN001
    blockers = [system.submit({"code.py": BLOCKER}, root=unique("e2e-block"))["id"]
                for _ in range(2)]
    for job_id in blockers:
        system.wait_for_state(job_id, "started", timeout=60)
    name = unique("e2e-results")
    waiting_id = system.submit({"code.py": RESULTS, "labq.toml": 'args = ["--x=1"]\n'},
                               root=name)["id"]

    # A queued job says where it stands and why.
    queued = context.new_page()
    queued.goto(f"/jobs/{waiting_id}")
    expect(queued.locator("#waiting")).to_be_visible()
    expect(queued.locator("#waiting-place")).to_have_text("1st in the queue")
    expect(queued.locator("#waiting-reason")).to_contain_text("2 workers busy")
    expect(queued.locator("#waiting-start")).not_to_be_empty()

    # A running job draws memory and CPU live; the browser is told when it ends.
    context.add_init_script(RECORD_NOTIFICATIONS)
    running = context.new_page()
    running.goto(f"/jobs/{blockers[0]}")
    chart = running.locator("#usage-chart svg polyline.series-mem")
    expect(chart).to_have_count(1, timeout=LIVE)
    running.wait_for_function(
        "Number(document.querySelector('#usage-chart').dataset.samples) >= 8", timeout=LIVE)
    running.screenshot(path=str(shots / "job-running.png"), full_page=True)
    running.click("#notify-me")
    expect(running.locator("#notify-me")).to_have_text("You will be notified when it ends")
    for job_id in blockers:
        assert system.set_state(job_id, "stopped").status_code in (200, 202)
    running.wait_for_function("window.__notes.length === 1", timeout=LIVE)
    note = running.evaluate("window.__notes[0]")
    assert "cancelled" in note["title"], note
    expect(running.locator("#notify-me")).to_be_hidden()
    expect(running.locator("#usage-summary")).to_contain_text("peak", timeout=LIVE)
    expect(running.locator("#usage-summary")).to_contain_text("CPU time")
    # The ended job's chart comes from its stored samples.
    running.reload()
    expect(running.locator("#usage-chart svg polyline.series-mem")).to_have_count(1)

    # The queued job ran: its stages, and every result previewed inline.
    system.wait_done(waiting_id, timeout=60)
    expect(queued.locator("#job-state .badge")).to_have_text("stopped", timeout=LIVE)
    expect(queued.locator("#waiting")).to_be_hidden()
    for stage in ("queued_s", "env_s", "run_s", "total_s"):
        expect(queued.locator(f'#stages dd[data-stage="{stage}"]')).to_have_count(1)
    previews = queued.locator("#previews")
    image = previews.locator('details[data-path="plot.png"] img')
    expect(image).to_be_visible(timeout=LIVE)
    queued.wait_for_function(
        "document.querySelector('details[data-path=\"plot.png\"] img').naturalWidth === 40")
    def opened(path: str):  # noqa: ANN202 - the first 4 previews start open, others on click
        details = previews.locator(f'details[data-path="{path}"]')
        if details.get_attribute("open") is None:
            details.locator("summary").click()
        return details

    table = opened("table.csv").locator("table")
    expect(table.locator("th")).to_have_text(["step", "loss"])
    expect(table.locator("tbody tr")).to_have_count(3)
    expect(table.locator("tbody tr").nth(2).locator("td").nth(1)).to_have_text("0,25")
    expect(opened("metrics.json").locator("pre")).to_contain_text('"loss": 0.25')
    expect(opened("notes.txt").locator("pre")).to_have_text("<b>not bold</b> all good\n")
    expect(opened("shape.svg").locator("img")).to_be_visible()  # an <img>: its script never runs
    assert queued.evaluate("window.__pwned") is None
    expect(queued.locator("#job-links")).to_contain_text("Reproducibility receipt")

    # Run again with other arguments: a new job from the same bundle.
    expect(queued.locator("#rerun-section")).to_be_visible()
    expect(queued.locator("#rerun-args")).to_have_value("--x=1")
    queued.fill("#rerun-args", "--x=2\n--seed=7")
    queued.fill("#rerun-memory", "256")
    queued.click("#rerun-submit")
    queued.wait_for_url(lambda url: "/jobs/" in url and waiting_id not in url, timeout=15_000)
    new_id = queued.url.rstrip("/").rsplit("/", 1)[-1]
    expect(queued.locator("#job-links")).to_contain_text("Re-run of")
    done = system.wait_done(new_id, timeout=60)
    assert done["spec"]["args"] == ["--x=2", "--seed=7"], done
    assert done["spec"]["memory_mb"] == 256 and done["rerun_of"] == waiting_id, done
    expect(queued.locator("#details")).to_contain_text("--x=2 --seed=7", timeout=LIVE)


def test_sweep_group_page(context, system, shots) -> None:  # noqa: ANN001
    name = unique("e2e-sweep")
    code = "import os\nprint('seed', os.environ['seed'])\n" \
           "open('output/seed.txt', 'w').write(os.environ['seed'])\n"
    first = system.submit({"code.py": code, "labq.toml": "[sweep]\nseed = [1, 2, 3]\n"},
                          root=name)
    group_id = first["group_id"]
    page = context.new_page()
    page.goto(f"/jobs/{first['id']}")
    page.click("#group-link")
    page.wait_for_url(f"**/groups/{group_id}")
    expect(page.locator("#group-name")).to_contain_text(f"{name} — sweep of 3")
    expect(page.locator("#group-wrap tbody tr")).to_have_count(3)
    expect(page.locator("#group-summary")).to_have_attribute("data-done", "true", timeout=LIVE)
    expect(page.locator("#group-wrap .badge")).to_have_text(["stopped"] * 3)
    expect(page.locator("#group-download")).to_be_visible()
    with page.expect_download() as info:
        page.click("#group-download")
    assert info.value.suggested_filename.endswith("-results.zip")
    page.screenshot(path=str(shots / "group.png"), full_page=True)


def test_out_of_memory_search_and_api_page(context, system) -> None:  # noqa: ANN001
    name = unique("e2e-oom")
    hog = "x = bytearray(400 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\n"
    job_id = system.submit({"code.py": hog, "labq.toml": "memory_mb = 64\n"}, root=name)["id"]
    done = system.wait_done(job_id, timeout=60)
    assert done["outcome"] == "error", done
    page = context.new_page()
    page.goto(f"/jobs/{job_id}")
    oom = page.locator("#oom")
    expect(oom).to_be_visible()
    expect(oom).to_contain_text("out of memory (limit 64 MB)")
    expect(oom).to_contain_text("at its peak")

    # Search by part of the name and filter by outcome.
    page.goto("/results")
    page.fill("#filter-name", name.split("-", 1)[1])
    page.select_option("#filter-outcome", "error")
    rows = page.locator("#jobs-wrap tbody tr")
    expect(rows).to_have_count(1)
    expect(rows).to_have_attribute("data-job-id", job_id)
    assert "outcome=error" in page.url and "q=" in page.url
    page.select_option("#filter-outcome", "succeeded")
    expect(page.locator("#jobs-empty")).to_be_visible()

    # The API page, from the package: every operation, browsable.
    page.click("text=REST API")
    page.wait_for_url("**/api/docs")
    ops = page.locator('details.api-op[data-path="/api/v1/jobs"]')
    expect(ops.first).to_be_visible()
    assert ops.count() >= 2  # GET and POST
    post = page.locator('details.api-op[data-path="/api/v1/jobs"][data-method="post"]')
    post.locator("summary").click()
    expect(post).to_contain_text("Request body")


def test_upload_form_sends_the_webhook(context, tmp_path) -> None:  # noqa: ANN001
    """The form's webhook field reaches the server's checks (a private address is refused
    on this server: nothing is contacted)."""
    from helpers import make_zip

    bundle = tmp_path / "hooked.zip"
    bundle.write_bytes(make_zip({"code.py": "print('hi')\n"}, root="hooked"))
    page = context.new_page()
    page.goto("/upload")
    page.set_input_files("#bundle", str(bundle))
    page.locator(".upload-options summary").click()
    page.fill("#notify-url", "http://127.0.0.1:9/hook")
    page.click("#submit")
    expect(page.locator("#upload-error")).to_be_visible()
    expect(page.locator("#upload-error-text")).to_contain_text("notify_url")
