"""Helpers of the browser tests shared by conftest and the test modules."""

from __future__ import annotations

ADMIN_PASSWORD = "e2e-admin-password"


def sign_in(ctx, url: str, name: str, password: str) -> None:  # noqa: ANN001
    """Sign a browser context in (the cookie lands in the context's jar)."""
    resp = ctx.request.post(f"{url}/login", data={"name": name, "password": password})
    assert resp.ok, resp.text()


def new_context(browser, system):  # noqa: ANN001, ANN201
    ctx = browser.new_context(base_url=system.url, viewport={"width": 1280, "height": 900},
                              accept_downloads=True)
    ctx.set_default_timeout(15_000)
    return ctx
