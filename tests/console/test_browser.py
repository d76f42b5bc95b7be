"""The console in a real browser: Debian's chromium driven by Playwright, against the app under uvicorn.

One server and one browser for the module. The tests list, filter and suspend (and see
the app refuse the tenant), follow a fleet upgrade to its end, and look at the traffic
and doctor pages; every page gets an accessibility pass (labels, names, keyboard) and a
screenshot in `test-artifacts/console/` (not committed; docs/images holds copies).

Chromium comes from Debian (`/usr/bin/chromium`), installed with apt-get when missing;
Playwright downloads no browser. Without it the tests skip, saying why, unless
TENANCY_TEST_REQUIRE_SERVICES=1, where they fail.
"""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy.engine import make_url

from fastapi_tenancy import TenancyConfig, TenancyManager

from ..apps import Base
from ..conftest import POSTGRES_URL, REQUIRE_SERVICES, _postgres_admin
from ..servers import free_port
from .conftest import HOSTILE
from .test_fleet import project

if TYPE_CHECKING:
    from playwright.sync_api import Browser, HttpCredentials, Page

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OPERATOR: "HttpCredentials" = {"username": "alice", "password": "secret"}
TENANTS = [
    ("acme-corp", "Acme Corporation", "pro"),
    ("globex", "Globex Inc.", "free"),
    ("initech", "Initech", "free"),
    ("umbrella", "Umbrella Corp", "enterprise"),
    ("hostile", HOSTILE, "free"),
    ("broken", "Broken Migrations Ltd", "pro"),
] + [(f"customer-{i:03d}", f"Customer {i}", ("free", "pro")[i % 2]) for i in range(1, 13)]


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"the browser tests need {reason} (TENANCY_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(f"the browser tests need {reason}")


def _ensure_chromium() -> None:
    """Debian's chromium, installed with apt-get when it is missing (CI has no other way to it)."""
    if CHROMIUM.exists():
        return
    apt = shutil.which("apt-get")
    if apt is not None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in ([apt, "install", "-y", "-q", "chromium"], [apt, "update", "-q"]):
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
            if CHROMIUM.exists():
                return
        subprocess.run([apt, "install", "-y", "-q", "chromium"], env=env, capture_output=True, timeout=900)
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} (apt-get install chromium failed or is not available)")


async def _seed(url: str) -> None:
    """The tenants, registered before the app starts (so that none is migrated at registration)."""
    manager = TenancyManager(TenancyConfig(database_url=url))
    await manager.initialize()
    try:
        for identifier, name, plan in TENANTS:
            await manager.register_tenant(
                identifier, name, app_metadata=Base.metadata, metadata={"plan": plan}
            )
        await manager.suspend_tenant("umbrella")
        async with manager.engine.begin() as conn:
            await conn.exec_driver_sql("CREATE TABLE tenant_broken.hostile_error (msg text)")
            await conn.exec_driver_sql("INSERT INTO tenant_broken.hostile_error VALUES ($1)", (HOSTILE,))
    finally:
        await manager.close()


async def _database(name: str, drop: bool = False) -> None:
    """Create (or drop) database `name`; with no name, only see that the server answers."""
    admin = await _postgres_admin(POSTGRES_URL)
    try:
        if name:
            await admin.execute(
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' if drop else f'CREATE DATABASE "{name}"'
            )
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The app of tests/console/server.py under uvicorn, on a fresh database; its base URL."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        _unavailable("the playwright package (pip install -e '.[dev]')")
    _ensure_chromium()
    try:
        asyncio.run(_database(""))
    except Exception as exc:
        _unavailable(f"PostgreSQL ({type(exc).__name__}: {exc})")
    name = f"ft_{uuid.uuid4().hex[:12]}"
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    workdir = Path(tempfile.mkdtemp(prefix="ft-console-"))
    asyncio.run(_database(name))
    try:
        asyncio.run(_seed(url))
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TENANCY_")},
            "TENANCY_DATABASE_URL": url,
            "TENANCY_ALEMBIC_CONFIG": str(project(workdir / "project", sleep=0.05)),
            "TENANCY_RATE_LIMIT_ENABLED": "true",
            "TENANCY_RATE_LIMIT_REQUESTS": "5",
        }
        log = (workdir / "uvicorn.log").open("w")
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.console.server:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                assert process.poll() is None, (workdir / "uvicorn.log").read_text()
                try:
                    if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
            yield base_url
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()
    finally:
        asyncio.run(_database(name, drop=True))
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator["Browser"]:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: "Browser", server: str) -> Iterator["Page"]:
    context = browser.new_context(
        base_url=server,
        http_credentials=OPERATOR,
        viewport={"width": 1280, "height": 860},
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors  # no script error, no content-security-policy violation


# An accessibility pass over the page as the browser built it: every control has a label,
# every link and button a name, plots are named images, tables have captions and header
# scopes, ids are unique, one h1, a language, no positive tabindex.
AUDIT = """() => {
  const problems = [];
  const html = (el) => el.outerHTML.slice(0, 90);
  if (!document.documentElement.lang) problems.push("no lang on <html>");
  if (document.querySelectorAll("h1").length !== 1) problems.push("not exactly one h1");
  if (!document.querySelector("main")) problems.push("no <main>");
  for (const el of document.querySelectorAll("input:not([type=hidden]), select, textarea, progress, meter")) {
    if (!el.labels?.length && !el.getAttribute("aria-label") && !el.getAttribute("aria-labelledby"))
      problems.push("no label: " + html(el));
  }
  for (const el of document.querySelectorAll("a[href], button")) {
    if (!el.textContent.trim() && !el.getAttribute("aria-label")) problems.push("no name: " + html(el));
  }
  for (const el of document.querySelectorAll("svg")) {
    const name = el.getAttribute("aria-labelledby");
    const named = name && document.getElementById(name);
    if (el.getAttribute("role") !== "img" || !named) problems.push("unnamed plot");
  }
  for (const el of document.querySelectorAll("table")) {
    if (!el.querySelector("caption")) problems.push("table without caption");
    for (const th of el.querySelectorAll("th")) {
      if (!th.getAttribute("scope")) problems.push("th without scope");
    }
  }
  for (const el of document.querySelectorAll("[tabindex]")) {
    if (+el.getAttribute("tabindex") > 0) problems.push("tabindex > 0");
  }
  const ids = [...document.querySelectorAll("[id]")].map((el) => el.id);
  for (const id of new Set(ids)) {
    if (ids.filter((x) => x === id).length > 1) problems.push("duplicate id " + id);
  }
  return problems;
}"""


def _check(page: "Page", name: str) -> None:
    """The accessibility pass, the keyboard's way in (skip link, visible focus), and a screenshot."""
    assert page.evaluate(AUDIT) == [], page.url
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "() => [document.activeElement.textContent, getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused == ["Skip to content", "solid"], focused
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _tab_to(page: "Page", text: str, limit: int = 80) -> None:
    """Press Tab until the focused element is the one labelled `text` (a keyboard user's way)."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent.trim()") == text:
            return
    raise AssertionError(f"{text!r} cannot be reached with the keyboard")


def _rows(page: "Page") -> list[str]:
    return page.locator("table.list tbody tr td:first-child").all_inner_texts()


def test_list_filter_suspend_and_the_app_refuses_the_tenant(page: "Page", server: str) -> None:
    page.goto("/_tenancy/")
    assert page.url.endswith("/_tenancy/tenants")
    assert page.get_by_role("heading", level=1).inner_text() == "Tenants"
    assert len(_rows(page)) == len(TENANTS)
    # The hostile name is shown as the text it is; nothing of it ran.
    assert HOSTILE in page.locator("td.name").all_inner_texts()
    assert page.evaluate("() => window.__pwned") is None
    _check(page, "tenants")

    # Filter with the keyboard: type in the labelled search field, Enter submits.
    page.get_by_label("Search identifier or name").fill("acme")
    page.keyboard.press("Enter")
    page.wait_for_url("**/tenants?q=acme**")
    assert _rows(page) == ["acme-corp"]
    page.get_by_label("Search identifier or name").fill("")
    page.get_by_label("Status").select_option("suspended")
    page.get_by_role("button", name="Filter").click()
    assert _rows(page) == ["umbrella"]
    page.get_by_label("Status").select_option("")
    page.get_by_label("Plan").fill("pro")
    page.get_by_role("button", name="Filter").click()
    assert set(_rows(page)) == {"acme-corp", "broken"} | {f"customer-{i:03d}" for i in range(1, 13, 2)}

    page.goto("/_tenancy/tenants")
    page.get_by_role("link", name="acme-corp").click()
    page.wait_for_url("**/tenants/acme-corp")
    assert "Acme Corporation" in page.get_by_role("heading", level=1).inner_text()
    _check(page, "tenant")
    assert httpx.get(f"{server}/orders", headers={"X-Tenant-ID": "acme-corp"}).status_code == 200

    # Suspend without the mouse: Tab to the button, press Enter.
    _tab_to(page, "Suspend")
    page.keyboard.press("Enter")
    page.wait_for_url("**/tenants/acme-corp?done=suspended")
    assert "Suspended: the application refuses" in page.get_by_role("status").inner_text()
    refused = httpx.get(f"{server}/orders", headers={"X-Tenant-ID": "acme-corp"})
    assert refused.status_code == 403, refused.text
    history = page.locator("section[aria-labelledby=history] tbody tr").first.inner_text()
    assert "suspended" in history and "console:alice" in history
    page.get_by_role("button", name="Activate").click()
    page.wait_for_url("**/tenants/acme-corp?done=activated")
    assert httpx.get(f"{server}/orders", headers={"X-Tenant-ID": "acme-corp"}).status_code == 200

    # Deleting wants the identifier typed: the browser holds back a form without it.
    page.goto("/_tenancy/tenants/initech")
    page.get_by_label("Type initech to confirm").fill("initec")
    page.get_by_role("button", name="Delete").click()
    assert page.url.endswith("/tenants/initech")
    assert page.evaluate("() => document.getElementById('confirm').validity.patternMismatch") is True
    page.get_by_label("Type initech to confirm").fill("initech")
    page.get_by_role("button", name="Delete").click()
    page.wait_for_url("**/tenants/initech?done=deleted")
    assert httpx.get(f"{server}/orders", headers={"X-Tenant-ID": "initech"}).status_code == 403

    page.goto("/_tenancy/tenants/hostile")
    assert page.get_by_role("heading", level=1).locator(".name").inner_text() == HOSTILE
    assert page.evaluate("() => window.__pwned") is None


def test_a_fleet_upgrade_is_shown_to_its_end(page: "Page") -> None:
    page.goto("/_tenancy/fleet")
    assert page.get_by_text("No fleet run recorded yet").is_visible()
    page.get_by_label("Canary tenants").fill("1")
    page.get_by_label("At a time").fill("2")
    page.get_by_role("button", name="Start upgrade").click()
    page.wait_for_url("**/fleet?done=started")
    # The page follows the run by itself (a refresh every few seconds) until it ends.
    page.get_by_text("Ended:").wait_for(timeout=90_000)
    assert page.locator("meta[http-equiv=refresh]").count() == 0
    ended = page.get_by_role("status").last.inner_text()
    planned = len(TENANTS) - 1  # initech was deleted
    assert f"Ended: {planned} tenants run, {planned - 1} migrated, 1 failed." in ended, ended
    _check(page, "fleet")
    page.get_by_role("link", name="See its results").click()
    page.wait_for_url("**/fleet/runs/*")
    assert f"{planned - 1} ok, 1 failed" in page.locator("p.summary").inner_text()
    assert page.locator("tr", has_text="broken").locator("pre.error-text").inner_text().endswith(HOSTILE)
    assert page.evaluate("() => window.__pwned") is None
    _check(page, "run")
    page.get_by_role("link", name="failed", exact=True).click()
    assert _rows(page) == ["broken"]


def test_the_traffic_and_doctor_pages(page: "Page", server: str) -> None:
    with httpx.Client(base_url=server) as client:
        for tenant, count in [("globex", 8), ("acme-corp", 4), ("customer-001", 2)]:
            for _ in range(count):
                client.get("/orders", headers={"X-Tenant-ID": tenant})
        time.sleep(1.2)  # another sample
        for _ in range(3):
            client.get("/orders", headers={"X-Tenant-ID": "globex"})
    page.goto("/_tenancy/traffic")
    page.wait_for_timeout(1200)
    page.reload()
    assert page.locator("svg[role=img]").count() == 4
    globex = page.locator("tr", has_text="globex").first.locator("td").all_inner_texts()
    assert globex[1:2] == ["5"] and globex[4] == "6", globex  # 5 served, 6 refused (429)
    _check(page, "traffic")
    page.get_by_role("link", name="Doctor").click()
    page.wait_for_url("**/doctor")
    assert page.get_by_role("cell", name="registry", exact=True).is_visible()
    _check(page, "doctor")
