"""Fixtures for the end-to-end tests: the system Chromium driven by Playwright's sync API.

The tests skip when ``/usr/bin/chromium`` is missing (``apt-get install chromium``), except
under CI (``CI=true``), where a missing browser is a failure, never a silent pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import ADMIN_PASSWORD, new_context, sign_in

CHROMIUM = Path(os.environ.get("LABQ_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(os.environ.get("LABQ_SHOTS_DIR", "/tmp/labq-shots"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (install it with: apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    _require_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - playwright is a dev dependency
        if os.environ.get("CI"):
            pytest.fail("the playwright package is not installed")
        pytest.skip("the playwright package is not installed")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                      args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def admin_password(system) -> str:  # noqa: ANN001
    """The admin labq made on its first start gets a known password for the browser."""
    done = system.labq("user", "passwd", "admin", input=f"{ADMIN_PASSWORD}\n")
    assert done.returncode == 0, done.stderr
    return ADMIN_PASSWORD


@pytest.fixture()
def context(browser, system, admin_password) -> Iterator[object]:  # noqa: ANN001
    ctx = new_context(browser, system)
    sign_in(ctx, system.url, "admin", admin_password)
    errors: list[str] = []
    ctx.on("weberror", lambda err: errors.append(str(err.error)))
    try:
        yield ctx
    finally:
        ctx.close()
    assert not errors, f"JavaScript errors in the pages: {errors}"


@pytest.fixture()
def page(context) -> object:  # noqa: ANN001
    return context.new_page()


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS
