"""What the browser tests (tests/test_ui_*.py) share: the one web server
they all talk to (tests/support/web.py), and Debian's chromium driven by
Playwright.

The server is started once per test run, by whichever browser test comes
first, and stopped when the run ends (a session fixture defined in each test
module would start one per module). The browser lives for one module; see
`chromium()` for why not longer.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from django.db import connection

from tests.support import ROOT
from tests.support.sockets import session_cookie
from tests.support.web import ASYNC_UNSAFE, WebServer
from tests.support.workers import test_database_url

CHROMIUM = Path("/usr/bin/chromium")
# FIELD-NOTES "Browser tests": no sandbox (containers), no GPU, and nothing
# that phones home while a test runs.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOTS = ROOT / "var" / "screenshots"

_server: WebServer | None = None


def live_server(request, stack) -> WebServer:
    """The web server of the browser tests, started by the first one."""
    global _server
    if _server is None:
        _server = WebServer(log_dir=stack.var, database_url=test_database_url(connection.settings_dict))
        request.config.add_cleanup(_server.stop)
        _server.start()
    return _server


@contextlib.contextmanager
def chromium():
    """Headless chromium, for one test module; each test opens its own context.

    Playwright's sync API keeps an asyncio loop running in this thread while
    it is started, and Django refuses ORM calls from a thread with a running
    loop (SynchronousOnlyOperation). The tests' ORM calls are plain
    synchronous code that only shares the thread, so the guard is lifted
    while the browser runs (as pytest-playwright's docs advise for Django),
    and only then: the loop and the lifted guard end with the module, before
    the test database is torn down and before other tests run.
    """
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    previous = os.environ.get(ASYNC_UNSAFE)
    os.environ[ASYNC_UNSAFE] = "true"
    try:
        with sync_api.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop(ASYNC_UNSAFE, None)
        else:
            os.environ[ASYNC_UNSAFE] = previous


def logged_in_context(browser, server: WebServer, user, **options):
    """A browser context with the user's session cookie: the login form is
    tested once, not paid for in every test."""
    context = browser.new_context(base_url=server.url, **options)
    context.add_cookies([{"name": "sessionid", "value": session_cookie(user), "url": server.url}])
    return context


#: Reports every Content-Security-Policy violation of the page to the test
#: (`securitypolicyviolation` fires on the document for each thing the
#: policy refused), from before the page's own scripts run; also kept in
#: `window.__cspViolations`, for a test to wait on with wait_for_function.
_CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const report = {directive: event.effectiveDirective, blocked: event.blockedURI,
                  source: event.sourceFile, line: event.lineNumber, sample: event.sample};
  window.__cspViolations.push(report);
  window.__cspViolation(report);
});
"""


def watched_page(context):
    """A page that records what must not happen: uncaught script errors,
    console errors, dialogs (the page opens none; model output must never
    open one), and anything the Content-Security-Policy refused (issue 17:
    the tests run with the policy enforced, as served). Tests assert
    `page.errors == []` and `page.dialogs == []`; `page.csp_violations`
    holds the violations alone (each is in `page.errors` too)."""
    page = context.new_page()
    page.errors, page.dialogs, page.csp_violations = [], [], []

    def error(text: str) -> None:
        page.errors.append(text)
        print(f"browser: {text}")  # shown with a failing test's captured output

    def violation(report: dict) -> None:
        page.csp_violations.append(report)
        error(f"content security policy: {report}")

    page.expose_function("__cspViolation", violation)
    page.add_init_script(_CSP_WATCH)
    page.on("pageerror", lambda exc: error(f"uncaught: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and error(f"console: {msg.text} at {msg.location}"))
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    return page


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    return path
