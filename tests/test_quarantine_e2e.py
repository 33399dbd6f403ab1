"""End to end: a GTUBE message is quarantined, the digest goes to a real SMTP server, the
release link is followed over real HTTP (and the release-by-mail address is used), and the
message arrives byte-exact at the sink."""
from __future__ import annotations

import re

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
    unmarked,
)

from filterd.reports.digest import run_reports


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


def _is_digest(m):
    return (m.message["Subject"] or "").startswith("Quarantine:") and "held" in m.message["Subject"]


async def _confirm_and_post(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        page = await r.text()
        assert r.status == 200, page
    assert 'method="post"' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    action = re.search(r'<form method="post" action="([^"]+)"', page).group(1)
    base = url.split("/q/")[0]
    async with session.post(base + action, data={"csrf": csrf}) as r:
        return r.status, await r.text()


async def test_gtube_quarantined_digest_release_link_delivers_byte_exact(pipeline_factory, sink):
    web_port = free_port()
    pipe = await pipeline_factory(*overrides(sink.port, web_port))
    raw = spam_message()
    result, held = await quarantine_message(pipe, raw, "spammer@spam.example",
                                            ["bob@example.org"])
    assert held == ["bob@example.org"]
    service = pipe.services.extra["quarantine"]
    [entry] = await service.qstore.entries_for("bob@example.org")
    assert entry.score >= 10 and "GTUBE" in [s[0] for s in entry.symbols]
    stored = await service.qstore.read_message(entry)
    assert stored == raw  # byte-exact as received ([quarantine] keep = "received")

    digests = await run_reports(service, send=True)
    assert [d.to for d in digests] == ["bob@example.org"]
    digest = await sink.wait_for(_is_digest)
    assert digest.rcpt_tos == ["bob@example.org"]
    text, html = parts(digest)
    assert "Cheap watches" in text and "Cheap watches" in html
    [release] = links(html, "release")
    assert release in text  # the plain-text alternative carries the same link

    # GET shows a confirmation and never acts (scanners prefetch links)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(release) as r:
            assert r.status == 200
        assert not sink.matching(lambda m: m.rcpt_tos == ["bob@example.org"]
                                 and not _is_digest(m))
        assert (await service.qstore.get(entry.id)).status == "held"
        status, page = await _confirm_and_post(http, release)
    assert status == 200, page
    assert "released" in page
    got = await sink.wait_for(lambda m: m.rcpt_tos == ["bob@example.org"] and not _is_digest(m))
    assert got.mail_from == "spammer@spam.example"
    assert unmarked(got.data) == stored  # byte-exact after the signed release mark
    assert await service.qstore.get(entry.id) is None  # gone from the index
    assert await service.qstore.entries_for("bob@example.org") == []

    # a second digest run has nothing new to say
    assert await run_reports(service, send=True, force=True) == []


async def test_release_by_mail_performs_action_and_confirms(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    raw = spam_message(subject="Mail release me", to="carol@example.org")
    await quarantine_message(pipe, raw, "spammer@spam.example", ["carol@example.org"])
    service = pipe.services.extra["quarantine"]
    await run_reports(service, send=True)
    digest = await sink.wait_for(_is_digest)
    text, html = parts(digest)
    assert links(html, "release") == [] and "http" not in text  # no web pages configured
    [mailto] = links(html, "mailto-release")
    address = mailto.removeprefix("mailto:").split("?")[0]
    assert address.startswith("quarantine+") and address.endswith("@gw.test")
    assert address in text

    # a stranger sending to the address is refused, nothing is released
    cmd = (f"From: mallory@evil.example\r\nTo: {address}\r\nSubject: release\r\n\r\n").encode()
    r = await pipe.scan(cmd, "mallory@evil.example", [address])
    assert r.outcomes[address].action.value == "discard"
    assert "refused" in r.outcomes[address].verdict.reason
    assert len(await service.qstore.entries_for("carol@example.org")) == 1

    # the user replying from their own address releases it
    cmd = (f"From: Carol <carol@example.org>\r\nTo: {address}\r\nSubject: release\r\n\r\n"
           ).encode()
    r = await pipe.scan(cmd, "carol@example.org", [address])
    assert r.outcomes[address].action.value == "discard"  # the command mail itself ends here
    assert "released" in r.outcomes[address].verdict.reason
    got = await sink.wait_for(lambda m: m.rcpt_tos == ["carol@example.org"]
                              and m.message["Subject"] == "Mail release me")
    assert unmarked(got.data) == raw
    confirm = await sink.wait_for(lambda m: m.rcpt_tos == ["carol@example.org"]
                                  and m.message["Subject"] == "Quarantine: done")
    assert "released" in confirm.message.get_body(("plain",)).get_content()
    assert await service.qstore.entries_for("carol@example.org") == []

    # replaying the same command does nothing more
    r = await pipe.scan(cmd, "carol@example.org", [address])
    assert "refused" in r.outcomes[address].verdict.reason
    assert len(sink.matching(lambda m: m.message["Subject"] == "Mail release me")) == 1


async def test_message_held_for_two_recipients_is_released_separately(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    raw = spam_message(subject="Two of us", to="a@example.org, b@example.org")
    _, held = await quarantine_message(pipe, raw, "s@spam.example",
                                       ["a@example.org", "b@example.org"])
    assert sorted(held) == ["a@example.org", "b@example.org"]
    service = pipe.services.extra["quarantine"]
    [ea] = await service.qstore.entries_for("a@example.org")
    [eb] = await service.qstore.entries_for("b@example.org")
    assert ea.id != eb.id and ea.message_id == eb.message_id
    await service.perform(ea, "release")
    got = await sink.wait_for(lambda m: m.message["Subject"] == "Two of us")
    assert got.rcpt_tos == ["a@example.org"]
    # b's entry and the shared file are still there
    assert (await service.qstore.get(eb.id)).status == "held"
    assert await service.qstore.read_message(eb) == raw
    await service.perform(eb, "delete")
    import os
    assert not os.path.exists(eb.path)


async def test_released_mail_relayed_back_through_the_filter_is_not_held_again(
        pipeline_factory, sink):
    """A milter site relays released mail through the same Postfix (and so the same filter):
    the signed release mark delivers it to its recipient, and only to them."""
    pipe = await pipeline_factory(*overrides(sink.port))
    service = pipe.services.extra["quarantine"]
    raw = spam_message(subject="round trip")
    await quarantine_message(pipe, raw, "s@spam.example", ["bob@example.org"])
    [e] = await service.qstore.entries_for("bob@example.org")
    await service.perform(e, "release")
    got = await sink.wait_for(lambda m: m.message["Subject"] == "round trip")
    again = await pipe.scan(got.data, "s@spam.example", ["bob@example.org", "eve@example.org"])
    assert again.outcomes["bob@example.org"].action.value == "accept"
    assert again.outcomes["bob@example.org"].verdict.reason == "released from quarantine"
    assert again.outcomes["eve@example.org"].action.value == "quarantine"  # not a free pass
    forged = got.data.replace(b"X-Filterd-Released: " + e.id.encode(),
                              b"X-Filterd-Released: " + b"0" * len(e.id))
    r = await pipe.scan(forged, "s@spam.example", ["bob@example.org"])
    assert r.outcomes["bob@example.org"].action.value == "quarantine"
