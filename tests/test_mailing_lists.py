"""Mailing lists through the pipeline: subscribe with confirmation, member and non-member posts,
moderation, VERP bounces, DMARC From rewriting, one-click unsubscribe tokens.

Outgoing mail is captured at filterd's submit seam here (the same place the gateway's queue
plugs in); tests/test_lists_gateway.py runs the same flow over SMTP to a real sink."""
from __future__ import annotations

import re

import pytest

from conftest import make_message
from filterd.dns import FixtureResolver
from filterd.lists import ListManager
from filterd.model import Message, Session


class Outbox:
    def __init__(self):
        self.sent: list[tuple[str, list[str], Message]] = []

    async def __call__(self, sender, recipients, data, meta):
        self.sent.append((sender, recipients, Message(data)))
        return "q"

    def take(self):
        out, self.sent = self.sent, []
        return out


@pytest.fixture
async def lists(pipeline_factory):
    dns = FixtureResolver({"_dmarc.strict.example": {"TXT": ["v=DMARC1; p=reject"]},
                           "_dmarc.relaxed.example": {"TXT": ["v=DMARC1; p=none"]},
                           # the author's own mail passes SPF (and so DMARC) at the gateway
                           "strict.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}})
    pipe = await pipeline_factory(resolver=dns)
    outbox = Outbox()
    pipe.services.extra["submit"] = outbox
    m = ListManager(pipe.services.store)
    await m.create("team@example.org", owners=["boss@example.org"], description="The team")
    session = Session(peer_ip="192.0.2.1", front_door="smtp")

    async def send(sender, rcpt, body="Hello list", subject="Hi", frm=None):
        raw = make_message(body, subject=subject, sender=frm or sender, to=rcpt)
        return await pipe.scan(raw, sender, [rcpt], session)

    return pipe, m, outbox, send


async def test_subscribe_needs_confirmation_from_the_same_address(lists):
    pipe, m, outbox, send = lists
    res = await send("ann@example.com", "team-subscribe@example.org")
    assert res.outcomes["team-subscribe@example.org"].action.value == "discard"
    [(sender, rcpts, conf)] = outbox.take()
    assert rcpts == ["ann@example.com"] and sender == "team-bounces+admin@example.org"
    confirm = conf.parsed.header("Reply-To")
    assert re.fullmatch(r"team-confirm\+[0-9a-f]{24}@example\.org", confirm)
    assert await m.members("team@example.org") == []
    # a confirmation from someone else does not subscribe ann
    await send("mallory@example.com", confirm)
    assert await m.members("team@example.org") == []
    assert "failed" in outbox.take()[0][2].parsed.subject
    # ann's reply does (tokens are single use, so ask again)
    await send("ann@example.com", "team-request@example.org", subject="subscribe")
    confirm = outbox.take()[0][2].parsed.header("Reply-To")
    await send("ann@example.com", confirm, subject="Re: Confirm")
    assert await m.members("team@example.org") == ["ann@example.com"]
    assert outbox.take()[0][2].parsed.subject == "Welcome to team@example.org"
    # replaying the token does nothing more
    await send("ann@example.com", confirm)
    assert "failed" in outbox.take()[0][2].parsed.subject


async def test_member_post_goes_to_every_active_member_with_list_headers_and_verp(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "ann@example.com", "bob@example.net")
    res = await send("ann@example.com", "team@example.org", subject="Agenda")
    assert res.outcomes["team@example.org"].action.value == "discard"
    sent = sorted(outbox.take(), key=lambda s: s[1])
    assert [(s, r) for s, r, _ in sent] == [
        ("team-bounces+ann=example.com@example.org", ["ann@example.com"]),
        ("team-bounces+bob=example.net@example.org", ["bob@example.net"])]
    copy = sent[1][2].parsed
    assert copy.header("List-Id") == "The team <team.example.org>"
    assert copy.header("List-Post") == "<mailto:team@example.org>"
    assert copy.header("List-Unsubscribe") == "<mailto:team-unsubscribe@example.org>"
    assert copy.header("Precedence") == "list"
    assert copy.subject == "Agenda" and copy.from_address == "ann@example.com"


async def test_non_member_post_is_held_and_a_moderator_approves_by_reply(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "ann@example.com")
    await send("stranger@example.com", "team@example.org", subject="Offer")
    [(_, rcpts, note)] = outbox.take()
    assert rcpts == ["boss@example.org"] and "waits for approval" in note.parsed.text
    moderate = note.parsed.header("Reply-To")
    # a non-owner cannot approve
    await send("stranger@example.com", moderate, body="approve")
    assert outbox.take() == []
    await send("boss@example.org", moderate, subject="Re: Moderate", body="approve\r\n> quoted")
    [(_, rcpts, copy)] = outbox.take()
    assert rcpts == ["ann@example.com"] and copy.parsed.subject == "Offer"


async def test_rejected_moderation_tells_the_author(lists):
    pipe, m, outbox, send = lists
    await send("stranger@example.com", "team@example.org")
    moderate = outbox.take()[0][2].parsed.header("Reply-To")
    await send("boss@example.org", moderate, body="reject")
    [(_, rcpts, notice)] = outbox.take()
    assert rcpts == ["stranger@example.com"] and "not accepted" in notice.parsed.subject


async def test_hard_bounces_to_the_verp_address_disable_a_member(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "gone@example.net", "ann@example.com")
    dsn = ("This is a delivery status notification.\r\n\r\n"
           "Final-Recipient: rfc822; gone@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n")
    for _ in range(3):
        await pipe.scan(make_message(dsn, subject="Undelivered", sender="mailer-daemon@x.net"),
                        "", ["team-bounces+gone=example.net@example.org"],
                        Session(front_door="smtp"))
    assert await m.disabled("team@example.org") == ["gone@example.net"]
    await send("ann@example.com", "team@example.org")
    assert [r for _, r, _ in outbox.take()] == [["ann@example.com"]]


async def test_dmarc_strict_author_domains_get_the_from_rewritten(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "ann@example.com", "carl@strict.example",
                        "dora@relaxed.example")
    await send("carl@strict.example", "team@example.org")
    copy = outbox.take()[0][2].parsed
    assert copy.from_address == "team@example.org"
    assert "via team" in copy.header("From")
    assert copy.header("Reply-To").endswith("<carl@strict.example>")
    await send("dora@relaxed.example", "team@example.org")
    assert outbox.take()[0][2].parsed.from_address == "dora@relaxed.example"


async def test_spam_to_a_list_is_not_distributed(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "ann@example.com")
    res = await send("ann@example.com", "team@example.org",
                     body="XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X")
    assert res.outcomes["team@example.org"].action.value == "reject"
    assert outbox.take() == []


async def test_one_click_unsubscribe_tokens_are_bound_to_list_and_member(lists):
    pipe, m, outbox, send = lists
    await m.add_members("team@example.org", "ann@example.com", "bob@example.net")
    info = await m.get("team@example.org")
    good = ListManager.unsubscribe_token(info, "ann@example.com")
    assert not await m.one_click_unsubscribe("team@example.org", "bob@example.net", good)
    assert not await m.one_click_unsubscribe("team@example.org", "ann@example.com", "0" * 32)
    assert await m.one_click_unsubscribe("team@example.org", "ann@example.com", good)
    assert await m.members("team@example.org") == ["bob@example.net"]


async def test_offline_check_never_sends_mail(lists, tmp_path):
    pipe, m, outbox, send = lists
    await pipe.scan(make_message(), "ann@example.com", ["team-subscribe@example.org"],
                    Session(front_door="check"))
    assert outbox.take() == []


async def test_one_click_unsubscribe_link_works_over_http_and_get_never_acts(pipeline_factory):
    import aiohttp

    from gateway_fixtures import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    pipe = await pipeline_factory("quarantine.enabled=true",
                                  f'quarantine.web_listen="127.0.0.1:{port}"',
                                  f'quarantine.base_url="{base}"',
                                  f'mailing_lists.web_base_url="{base}"')
    outbox = Outbox()
    pipe.services.extra["submit"] = outbox
    m = ListManager(pipe.services.store)
    await m.create("team@example.org")
    await m.add_members("team@example.org", "ann@example.com", "bob@example.net")
    await pipe.scan(make_message(sender="ann@example.com", to="team@example.org"),
                    "ann@example.com", ["team@example.org"], Session(front_door="smtp"))
    copy = next(msg for _, r, msg in outbox.take() if r == ["bob@example.net"]).parsed
    assert copy.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    url = re.search(r"<(http[^>]+)>", copy.header("List-Unsubscribe")).group(1)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:  # a link scanner's prefetch
            assert r.status == 200 and "Unsubscribe" in await r.text()
        assert "bob@example.net" in await m.members("team@example.org")
        forged = re.sub(r"token=[0-9a-f]+", "token=" + "0" * 32, url)
        async with http.post(forged, data={"List-Unsubscribe": "One-Click"}) as r:
            assert r.status == 403
        async with http.post(url, data={"List-Unsubscribe": "One-Click"}) as r:
            assert r.status == 200
    assert await m.members("team@example.org") == ["ann@example.com"]
