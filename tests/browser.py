"""Debian's Chromium, headless, driven by Playwright: pages are checked in a real browser.

Playwright's own browser download is never used (nothing is fetched at test time): the
``chromium`` of the Debian package is launched through ``executable_path``. Without it a
test skips on a workstation and fails in CI (``CI=true``), like the other real peers.

    with open_page("file:///…/report.html") as view:
        assert broken_images(view.page) == [] and view.errors == []
        view.page.screenshot(path=…)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest


def chromium_path() -> str:
    """Path of Debian's Chromium; skip without it, but fail in CI."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    message = "chromium is not installed (Debian package chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


#: Software WebGL (SwiftShader) for headless Chromium without a GPU: what OHIF's
#: cornerstone viewports need to render.
WEBGL_ARGS = ("--enable-unsafe-swiftshader", "--use-angle=swiftshader", "--ignore-gpu-blocklist")


@dataclass
class View:
    """A loaded page and what went wrong while it loaded (one line each)."""

    page: Any
    errors: list[str] = field(default_factory=list)


@contextmanager
def open_page(
    url: str,
    *,
    width: int = 1280,
    height: int = 800,
    extra_headers: dict[str, str] | None = None,
    timeout_ms: int = 60_000,
    args: Sequence[str] = (),
) -> Iterator[View]:
    """A Playwright page with ``url`` loaded (``load`` fired and the network idle).

    Console errors, page errors and failed requests are collected on ``View.errors`` so a
    test can assert the page loaded cleanly. ``args`` are more Chromium flags (a WebGL
    page such as OHIF needs ``WEBGL_ARGS``).
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", *args]
        )
        try:
            context = browser.new_context(
                viewport={"width": width, "height": height}, extra_http_headers=extra_headers
            )
            page = context.new_page()
            view = View(page)
            errors = view.errors
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(url, wait_until="load", timeout=timeout_ms)
            page.wait_for_load_state("networkidle", timeout=timeout_ms)
            yield view
        finally:
            browser.close()


def broken_images(page: Any) -> list[str]:
    """The ``src`` (first 80 characters) of every ``<img>`` that did not load and decode."""
    result = page.evaluate(
        """() => Array.from(document.images)
              .filter(img => !(img.complete && img.naturalWidth > 0))
              .map(img => (img.currentSrc || img.src).slice(0, 80))"""
    )
    return [str(src) for src in result]


def image_count(page: Any) -> int:
    return int(page.evaluate("() => document.images.length"))
