"""Action links are unforgeable, expire, are single-use where it matters and bound to their
user; subjects with HTML/JS are shown as text in the digest and on the pages."""
from __future__ import annotations

import re
import time

import aiohttp
import pytest
from quarantine_support import (
    Sink,
    free_port,
    links,
    overrides,
    parts,
    quarantine_message,
    spam_message,
)

from filterd.quarantine import Signer, TokenError
from filterd.reports.digest import run_reports

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
async def setup(pipeline_factory, sink):
    web_port = free_port()
    pipe = await pipeline_factory(*overrides(sink.port, web_port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="for bob"), "s@spam.example",
                             ["bob@example.org"])
    await quarantine_message(pipe, spam_message(subject="for eve"), "s@spam.example",
                             ["eve@example.org"])
    [bob] = await service.qstore.entries_for("bob@example.org")
    [eve] = await service.qstore.entries_for("eve@example.org")
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        yield service, f"http://127.0.0.1:{web_port}", bob, eve, http


def test_signer_refuses_forged_expired_and_moved_tokens():
    s = Signer(b"k" * 32)
    t = s.make("release", "0123456789ab", "bob@example.org", 3600)
    assert s.verify(t, "bob@example.org").action == "release"
    assert s.verify(t.upper(), "BOB@example.org").entry_id == "0123456789ab"  # case-insensitive
    forged = t[:-1] + ("a" if t[-1] != "a" else "b")
    with pytest.raises(TokenError, match="invalid"):
        s.verify(forged, "bob@example.org")
    with pytest.raises(TokenError, match="invalid"):
        s.verify(t, "eve@example.org")  # another user's
    with pytest.raises(TokenError, match="invalid"):
        s.verify("d" + t[1:], "bob@example.org")  # another action
    with pytest.raises(TokenError, match="invalid"):
        s.verify(t.replace("0123456789ab", "0123456789ac"), "bob@example.org")  # another entry
    with pytest.raises(TokenError, match="invalid"):
        Signer(b"x" * 32).verify(t, "bob@example.org")  # another gateway's secret
    old = s.make("release", "0123456789ab", "bob@example.org", 60, now=time.time() - 3600)
    with pytest.raises(TokenError, match="expired"):
        s.verify(old, "bob@example.org")
    with pytest.raises(TokenError, match="malformed"):
        s.verify("r'><script>", "bob@example.org")


async def _post_confirm(http, url):
    async with http.get(url) as r:
        page = await r.text()
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    base = url.split("/q/")[0]
    path = "/q/" + url.split("/q/", 1)[1]
    async with http.post(base + path, data={"csrf": m.group(1) if m else ""}) as r:
        return r.status, await r.text()


async def test_forged_token_refused_over_http(setup):
    service, base, bob, eve, http = setup
    t = service.token("release", bob)
    forged = t[:-2] + ("aa" if not t.endswith("aa") else "bb")
    async with http.get(f"{base}/q/a/{forged}") as r:
        assert r.status == 403
        assert "invalid token" in await r.text()
    # bob's token letters on eve's entry
    moved = t.replace(bob.id, eve.id)
    async with http.get(f"{base}/q/a/{moved}") as r:
        assert r.status == 403
    assert (await service.qstore.get(bob.id)).status == "held"
    assert (await service.qstore.get(eve.id)).status == "held"


async def test_expired_token_refused(setup):
    service, base, bob, eve, http = setup
    old = service.signer.make("release", bob.id, bob.recipient, 60, now=time.time() - 7200)
    async with http.get(f"{base}/q/a/{old}") as r:
        assert r.status == 403
        assert "expired" in await r.text()
    status, page = await _post_confirm(http, f"{base}/q/a/{old}")
    assert status == 403
    assert (await service.qstore.get(bob.id)).status == "held"


async def test_replayed_release_refused(setup):
    service, base, bob, eve, http = setup
    url = service.action_url("release", bob)
    status, page = await _post_confirm(http, url)
    assert status == 200 and "released" in page
    async with http.get(url) as r:
        assert r.status == 403  # the entry is gone: the link is dead
    status, page = await _post_confirm(http, url)
    assert status in (403, 409)
    # a block link for the released entry cannot act either
    status, _ = await _post_confirm(http, service.action_url("delete", bob))
    assert status in (403, 409)


async def test_post_without_csrf_or_from_another_site_refused(setup):
    service, base, bob, eve, http = setup
    url = service.action_url("release", bob)
    path = "/q/" + url.split("/q/", 1)[1]
    async with http.post(base + path, data={}) as r:  # no confirmation page, no CSRF value
        assert r.status == 403
    async with http.get(url) as r:
        page = await r.text()
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    async with http.post(base + path, data={"csrf": csrf},
                         headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403
    # the CSRF value is bound to this browser's cookie: another browser cannot reuse it
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as other:
        async with other.post(base + path, data={"csrf": csrf}) as r:
            assert r.status == 403
    assert (await service.qstore.get(bob.id)).status == "held"


async def test_cross_user_login_and_list_actions_refused(setup):
    service, base, bob, eve, http = setup
    login = service.login_url("bob@example.org")
    # bob's login token with eve's address
    async with http.get(login.replace("bob%40example.org", "eve%40example.org")) as r:
        assert r.status == 403
    async with http.get(login) as r:
        page = await r.text()
        assert r.status == 200 and "for bob" in page and "for eve" not in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    # bob's session acting on eve's entry
    async with http.post(f"{base}/q/list/act", data={"csrf": csrf, "entry": eve.id,
                                                     "action": "delete"}) as r:
        assert r.status == 404
    assert (await service.qstore.get(eve.id)).status == "held"
    # and without the session's CSRF value nothing happens either
    async with http.post(f"{base}/q/list/act", data={"csrf": "x", "entry": bob.id,
                                                     "action": "delete"}) as r:
        assert r.status == 403
    async with http.post(f"{base}/q/list/act", data={"csrf": csrf, "entry": bob.id,
                                                     "action": "delete"}) as r:
        assert r.status == 200 and "deleted" in await r.text()
    assert await service.qstore.get(bob.id) is None


async def test_html_in_subject_is_escaped_in_digest_and_pages(pipeline_factory, sink):
    web_port = free_port()
    pipe = await pipeline_factory(*overrides(sink.port, web_port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject=XSS, sender="x@spam.example"),
                             "x@spam.example", ["bob@example.org"])
    await run_reports(service, send=True)
    digest = await sink.wait_for(lambda m: m.rcpt_tos == ["bob@example.org"])
    text, html = parts(digest)
    assert "<script>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert XSS in text  # plain text shows it as is
    [release] = links(html, "release")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(release) as r:
            page = await r.text()
            assert "Content-Security-Policy" in r.headers
        assert "<script>" not in page and "&lt;script&gt;" in page
        async with http.get(service.login_url("bob@example.org")) as r:
            page = await r.text()
        assert "<script>" not in page and "&lt;script&gt;" in page
