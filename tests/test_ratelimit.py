"""Sliding-window rate limits per client IP, per sender and per authenticated user, against
both store backends."""
from __future__ import annotations

import asyncio

import pytest

# fixtures: store, backend, store_overrides, redis_prefix, own_redis (tests/store_fixtures.py)
pytest_plugins = ["store_fixtures"]

from filterd.model import Session
from filterd.verdict import Action


def smtp(ip: str, auth: str = "") -> Session:
    return Session(peer_ip=ip, auth_user=auth, front_door="smtp")


@pytest.fixture
async def rl(pipeline_factory, store_overrides):
    async def make(*extra):
        return await pipeline_factory(*store_overrides, *extra)
    return make


async def mail(pipe, ip, sender, auth=""):
    ctx = pipe.begin(smtp(ip, auth))
    return ctx, await pipe.mail_from(ctx, sender, {})


async def test_per_ip_limit_defers_over_the_limit_with_the_configured_reply(rl):
    pipe = await rl("ratelimit.ip.limit=3")
    for i in range(3):
        _, v = await mail(pipe, "198.51.100.1", f"s{i}@a.test")
        assert v is None
    ctx, v = await mail(pipe, "198.51.100.1", "s9@a.test")
    assert v.action is Action.TEMPFAIL
    code, enhanced, text = v.smtp_reply()
    assert (code, enhanced) == (451, "4.7.1")
    assert "Too many messages from 198.51.100.1 (more than 3 per 1m)" in text
    assert ctx.has_symbol("RATELIMITED")
    _, v = await mail(pipe, "198.51.100.2", "s@a.test")  # another client is not affected
    assert v is None


async def test_per_sender_limit_can_reject_with_custom_text(rl):
    pipe = await rl("ratelimit.sender.limit=2", "ratelimit.sender.action=reject",
                    "ratelimit.sender.code=550", "ratelimit.sender.enhanced=5.7.1",
                    "ratelimit.sender.text=Slow down {subject}")
    for ip in ("198.51.100.3", "198.51.100.4"):
        _, v = await mail(pipe, ip, "Bulk@News.test")
        assert v is None
    _, v = await mail(pipe, "198.51.100.5", "bulk@news.test")
    assert v.action is Action.REJECT
    assert v.smtp_reply() == (550, "5.7.1", "Slow down bulk@news.test")
    _, v = await mail(pipe, "198.51.100.5", "")  # the null sender is not counted
    assert v is None


async def test_authenticated_user_is_limited_per_recipient_outbound(rl):
    pipe = await rl("ratelimit.user.limit=5", "ratelimit.ip.limit=1")
    ctx, v = await mail(pipe, "192.0.2.50", "alice@example.org", auth="alice")
    assert v is None  # authenticated: not counted per IP
    outcomes = [(await pipe.rcpt_to(ctx, f"r{i}@remote.test", {})).action for i in range(7)]
    assert outcomes[:5] == [Action.ACCEPT] * 5
    assert outcomes[5:] == [Action.TEMPFAIL] * 2
    v = await pipe.rcpt_to(ctx, "again@remote.test", {})
    assert v.smtp_reply()[0] == 450 and "Sending limit reached for alice" in v.smtp_reply()[2]
    ctx, _ = await mail(pipe, "192.0.2.50", "bob@example.org", auth="bob")
    assert (await pipe.rcpt_to(ctx, "x@remote.test", {})).action is Action.ACCEPT


async def test_window_slides(rl):
    pipe = await rl("ratelimit.ip.limit=2", "ratelimit.ip.window=1s")
    for _ in range(2):
        assert (await mail(pipe, "198.51.100.6", "a@b.test"))[1] is None
    assert (await mail(pipe, "198.51.100.6", "a@b.test"))[1].action is Action.TEMPFAIL
    await asyncio.sleep(1.1)
    assert (await mail(pipe, "198.51.100.6", "a@b.test"))[1] is None


async def test_local_clients_and_filterd_check_are_exempt(rl):
    pipe = await rl("ratelimit.ip.limit=1")
    for _ in range(3):
        assert (await mail(pipe, "127.0.0.1", "a@b.test"))[1] is None
    for _ in range(3):
        ctx = pipe.begin(Session(peer_ip="198.51.100.9"))  # front door "check"
        assert await pipe.mail_from(ctx, "a@b.test", {}) is None
