"""A real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) opens the digest,
follows its release link to the confirmation page, presses the button, then signs in with the
list link and releases another message from the list. Screenshots go to tests/artifacts/."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from quarantine_support import Sink, free_port, overrides, parts, quarantine_message, spam_message

from filterd.reports.digest import run_reports

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason="Debian chromium not installed (.ci/packages.d)")


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


async def test_chromium_confirms_and_releases_from_digest_and_list(pipeline_factory, sink):
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    web_port = free_port()
    pipe = await pipeline_factory(*overrides(sink.port, web_port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="Invoice overdue", sender="a@spam.example"),
                             "a@spam.example", ["bob@example.org"])
    await quarantine_message(pipe, spam_message(subject=XSS, sender="b@spam.example"),
                             "b@spam.example", ["bob@example.org"])
    await run_reports(service, send=True)
    digest = await sink.wait_for(lambda m: m.rcpt_tos == ["bob@example.org"])
    _, html = parts(digest)
    (ARTIFACTS / "quarantine-digest.html").write_text(html, encoding="utf-8")

    dialogs = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 700})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            # the digest as a mail client shows it
            await page.goto((ARTIFACTS / "quarantine-digest.html").as_uri())
            await page.screenshot(path=str(ARTIFACTS / "quarantine-digest.png"), full_page=True)
            row = page.locator("tr.entry", has_text="Invoice overdue")
            await row.locator("a.release").click()
            await page.wait_for_selector("#confirm")
            assert await page.text_content("#subject") == "Invoice overdue"
            await page.screenshot(path=str(ARTIFACTS / "quarantine-confirm.png"), full_page=True)
            # opening the page did not release anything
            assert not sink.matching(lambda m: m.message["Subject"] == "Invoice overdue")
            await page.click("#confirm")
            await page.wait_for_selector("#result, #error")
            assert await page.locator("#error").count() == 0, await page.text_content("#error")
            assert "released" in await page.text_content("#result")
            await page.screenshot(path=str(ARTIFACTS / "quarantine-result.png"), full_page=True)
            got = await sink.wait_for(lambda m: m.message["Subject"] == "Invoice overdue")
            assert got.rcpt_tos == ["bob@example.org"]

            # the per-user list, reached by the signed login link
            await page.goto(service.login_url("bob@example.org"))
            await page.wait_for_selector("tr.entry")
            rows = page.locator("tr.entry")
            assert await rows.count() == 1
            assert await rows.first.locator("td.subject").text_content() == XSS  # shown as text
            await page.screenshot(path=str(ARTIFACTS / "quarantine-list.png"), full_page=True)
            await rows.first.locator("button.release").click()
            await page.wait_for_selector("#result")
            assert "released" in await page.text_content("#result")
            assert await page.locator("#empty").count() == 1
            got = await sink.wait_for(lambda m: m.message["Subject"] == XSS)
            assert got.rcpt_tos == ["bob@example.org"]

            # the digest frequency is saved from the same page
            await page.select_option("#frequency", "weekly")
            await page.click("form[action='/q/prefs'] button")
            await page.wait_for_selector("#result")
            assert (await service.qstore.prefs("bob@example.org"))["frequency"] == "weekly"
        finally:
            await browser.close()
    assert dialogs == []  # no script from a subject ever ran
    assert await service.qstore.entries_for("bob@example.org") == []
