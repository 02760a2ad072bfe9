"""The web console in a real browser (the system's chromium, headless, through
Playwright) against the services running as processes: what a user and an operator
see and do, page by page. Each test keeps screenshots in its temporary directory (and
in `MEDHIVE_SCREENSHOT_DIR` when set: the README's pictures come from there)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from medhive.client import Client
from shared.settings import MongoSettings
from tests.e2e.support import client, spec, wait_state
from tests.helpers import make_token
from tests.processes import Stack

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: How long a page may take to show what a job did (a container start included).
SEEN_MS = 60_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            # As root there is no user namespace to sandbox in; no calls home either.
            args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"],
        )
        yield browser
        await browser.close()


class Screens:
    """Screenshots of a test, named in the order they were taken."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.copies = (
            Path(os.environ["MEDHIVE_SCREENSHOT_DIR"])
            if os.environ.get("MEDHIVE_SCREENSHOT_DIR")
            else None
        )

    async def take(self, page: Page, name: str) -> None:
        path = self.directory / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 0
        if self.copies is not None:
            self.copies.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, self.copies / path.name)


@pytest.fixture
def screens(tmp_path: Path) -> Screens:
    return Screens(tmp_path / "screenshots")


Clients = Callable[[str], Client]


@pytest.fixture
async def clients(stack: Stack) -> AsyncIterator[Clients]:
    """API clients with these tokens, closed after the test."""
    made: list[Client] = []

    def make(token: str) -> Client:
        made.append(client(stack, token))
        return made[-1]

    yield make
    for each in made:
        await each.close()


async def sign_in(browser: Browser, stack: Stack, token: str, screens: Screens) -> Page:
    page = await browser.new_page(viewport={"width": 1366, "height": 800}, accept_downloads=True)
    await page.goto(f"{stack.api}/ui/")
    await expect(page.get_by_role("heading", name="Sign in to medhive")).to_be_visible()
    await expect(page.get_by_role("navigation")).to_be_hidden()  # nothing before signing in
    await screens.take(page, "sign-in")
    # By keyboard alone: the token's field has the focus, Enter signs in.
    await expect(page.get_by_label("API token")).to_be_focused()
    await page.keyboard.type(token)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    return page


async def test_a_user_watches_a_job_succeed_reads_its_logs_and_downloads_its_result(
    stack: Stack,
    browser: Browser,
    clients: Clients,
    user_token: str,
    screens: Screens,
    tmp_path: Path,
) -> None:
    api = clients(user_token)
    page = await sign_in(browser, stack, user_token, screens)
    # The jobs page: its filters, its table, the pages of the console.
    await expect(page.get_by_label("State")).to_be_visible()
    await expect(page.get_by_label("Name starts with")).to_be_visible()
    await expect(page.get_by_role("table", name="Jobs")).to_be_visible()
    for name in ("Jobs", "Nodes", "Audit"):
        await expect(page.get_by_role("navigation").get_by_role("link", name=name)).to_be_visible()
    await expect(page.get_by_role("link", name="Tenants")).to_be_hidden()  # operators only
    await expect(page.get_by_text("Live: changes appear")).to_be_visible()
    await page.evaluate("window.notReloaded = true")

    script = "sleep 1; echo hello from the console test; printf 'result\\n' > /outputs/result.txt"
    job = await api.submit(spec("console-demo", "sh", "-c", script, outputs={"max_mb": 1}))
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    await expect(row).to_be_visible(timeout=SEEN_MS)
    await expect(row.locator("[data-state]")).to_have_attribute(
        "data-state", "succeeded", timeout=SEEN_MS
    )
    assert await page.evaluate("window.notReloaded") is True  # it came live, not by reload
    await screens.take(page, "console-jobs")

    # The job's page: its timeline, its records, its logs and its result.
    await row.get_by_role("link", name="console-demo").click()
    await expect(page.get_by_role("heading", name="Timeline")).to_be_visible()
    timeline = page.get_by_role("list", name="State timeline")
    for state in ("queued", "dispatched", "running", "succeeded"):
        await expect(timeline.locator(f'[data-state="{state}"]').first).to_be_visible()
    records = page.get_by_role("table", name="Audit records of the job")
    await expect(records.get_by_text("job.succeeded")).to_be_visible(timeout=SEEN_MS)
    await expect(page.get_by_role("button", name="Cancel job…")).to_have_count(0)
    await page.get_by_role("button", name="Show logs").click()
    await expect(page.locator("#stdout")).to_contain_text("hello from the console test")
    await screens.take(page, "console-job")

    results = page.get_by_role("table", name="Results")
    await expect(results.get_by_text("result.txt")).to_be_visible()
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Download result.txt").click()
    download = await download_info.value
    saved = tmp_path / "downloaded.txt"
    await download.save_as(saved)
    listed = {item["path"]: item["sha256"] for item in (await api.outputs(job["id"]))["files"]}
    digest = hashlib.sha256(saved.read_bytes()).hexdigest()
    assert digest == listed["result.txt"] == hashlib.sha256(b"result\n").hexdigest()


async def test_a_user_cancels_a_running_job_and_cannot_open_another_tenants(
    stack: Stack,
    browser: Browser,
    clients: Clients,
    user_token: str,
    screens: Screens,
    mongo_settings: MongoSettings,
) -> None:
    api = clients(user_token)
    other = clients(await make_token(mongo_settings, "cardiology"))
    theirs = await other.submit(spec("theirs", "true"))
    running = await api.submit(spec("long-one", "sleep", "300"))
    await wait_state(api, running["id"], {"running"})
    refused = await browser.new_page()
    await refused.goto(f"{stack.api}/ui/")
    await refused.get_by_label("API token").fill("mh_not-a-token")
    await refused.get_by_role("button", name="Sign in").click()
    await expect(refused.get_by_role("alert")).to_contain_text("unknown or revoked")
    await refused.close()
    page = await sign_in(browser, stack, user_token, screens)

    # The nodes page: the node, online, its capacity, heartbeat and running job.
    await page.get_by_role("navigation").get_by_role("link", name="Nodes").click()
    node = page.locator(f'tr[data-node="{stack.node_id}"]')
    await expect(node.locator('[data-state="online"]')).to_be_visible()
    await expect(node.locator("time")).to_be_visible()
    await expect(node.get_by_role("link", name=running["id"])).to_be_visible()
    await screens.take(page, "nodes")

    await page.goto(f"{stack.api}/ui/#/jobs/{running['id']}")
    await expect(page.locator("#job-state [data-state]")).to_have_attribute("data-state", "running")
    await page.get_by_role("button", name="Cancel job…").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog).to_contain_text("long-one")
    await screens.take(page, "cancel-confirm")
    await dialog.get_by_role("button", name="Cancel the job").click()
    await expect(page.locator("#job-state [data-state]")).to_have_attribute(
        "data-state", "cancelled", timeout=SEEN_MS
    )
    assert (await api.job(running["id"]))["state"] == "cancelled"
    await screens.take(page, "cancelled")

    # Another tenant's job is not there for this token, on the page as in the API.
    await page.goto(f"{stack.api}/ui/#/jobs/{theirs['id']}")
    await expect(page.get_by_role("alert")).to_contain_text("another tenant's")
    await expect(page.get_by_role("list", name="State timeline")).to_be_empty()
    await screens.take(page, "other-tenant")


async def test_an_operator_follows_the_audit_tail_across_a_restart_of_the_audit(
    stack: Stack, browser: Browser, clients: Clients, operator_token: str, screens: Screens
) -> None:
    api = clients(operator_token)
    first = await api.submit(spec("before-restart", "true"))
    await wait_state(api, first["id"])
    page = await sign_in(browser, stack, operator_token, screens)
    await page.get_by_role("navigation").get_by_role("link", name="Audit").click()
    table = page.get_by_role("table", name="Audit records, newest first")
    await expect(page.get_by_text("Chain verified")).to_be_visible(timeout=SEEN_MS)
    await expect(table.locator(f'a[href="#/jobs/{first["id"]}"]').first).to_be_visible()
    await screens.take(page, "audit")

    # The audit goes down: the page says so; it comes back: the tail goes on.
    stack.stop("audit")
    await expect(page.get_by_role("status").get_by_text("Live updates interrupted")).to_be_visible()
    await screens.take(page, "audit-interrupted")
    await stack.restart("audit")
    second = await api.submit(spec("after-restart", "true"))
    await wait_state(api, second["id"])
    await expect(table.locator(f'a[href="#/jobs/{second["id"]}"]').first).to_be_visible(
        timeout=SEEN_MS
    )
    await expect(page.get_by_text("Live: changes appear")).to_be_visible()
    # Every record once, none missing: an operator's unfiltered tail is gapless.
    seqs = [
        int(seq)
        for seq in await table.locator("tr[data-seq]").evaluate_all(
            "rows => rows.map(row => row.dataset.seq)"
        )
    ]
    assert len(seqs) == len(set(seqs))
    assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1))
    assert seqs == sorted(seqs, reverse=True)  # newest first

    # A long trail in pages: the live tail starts 5 records back here, then goes back.
    await page.goto(f"{stack.api}/ui/#/audit?back=5")
    rows = table.locator("tr[data-seq]")
    await expect(rows.first).to_be_visible()
    first = min(int(seq) for seq in await rows.evaluate_all("rs => rs.map(r => r.dataset.seq)"))
    await page.get_by_role("button", name="Earlier records").click()
    await expect(table.locator(f'tr[data-seq="{first - 5}"]')).to_be_visible()
    paged = [int(seq) for seq in await rows.evaluate_all("rs => rs.map(r => r.dataset.seq)")]
    assert len(paged) == len(set(paged))
    assert sorted(paged) == list(range(first - 5, max(paged) + 1))

    # Tenants, for operators.
    await page.get_by_role("navigation").get_by_role("link", name="Tenants").click()
    await expect(page.get_by_role("table", name="Tenants")).to_contain_text("ops")
    await screens.take(page, "tenants")
