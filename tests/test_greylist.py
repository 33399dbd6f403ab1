"""Greylisting at RCPT TO, against both store backends (real delays of about a second)."""
from __future__ import annotations

import asyncio

import pytest
from conftest import make_message

# fixtures: store, backend, store_overrides, redis_prefix, own_redis (tests/store_fixtures.py)
pytest_plugins = ["store_fixtures"]

from filterd.model import Session
from filterd.verdict import Action

MSG = make_message()


def smtp(ip: str, auth: str = "") -> Session:
    return Session(peer_ip=ip, auth_user=auth, front_door="smtp")


@pytest.fixture
async def grey(pipeline_factory, store_overrides):
    async def make(*extra):
        return await pipeline_factory(*store_overrides, "greylist.enabled=true",
                                      "greylist.delay=1s", *extra)
    return make


async def rcpt(pipe, ip, sender, addr, auth=""):
    ctx = pipe.begin(smtp(ip, auth))
    await pipe.mail_from(ctx, sender, {})
    return ctx, await pipe.rcpt_to(ctx, addr, {})


async def test_first_attempt_is_deferred_and_a_retry_after_the_delay_passes(grey):
    pipe = await grey()
    _, v = await rcpt(pipe, "198.51.100.7", "a@sender.test", "u@example.org")
    assert v.action is Action.TEMPFAIL
    code, enhanced, text = v.smtp_reply()
    assert (code, enhanced) == (451, "4.7.1")
    assert "Greylisted" in text and "retry in 1 seconds" in text
    # too early: still deferred (and the clock is not restarted)
    _, v = await rcpt(pipe, "198.51.100.7", "a@sender.test", "u@example.org")
    assert v.action is Action.TEMPFAIL
    await asyncio.sleep(1.1)
    ctx, v = await rcpt(pipe, "198.51.100.7", "a@sender.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL
    assert ctx.has_symbol("GREYLIST_PASSED")
    # known triplet: passes at once from now on, also from another host of the same /24
    _, v = await rcpt(pipe, "198.51.100.200", "a@sender.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL
    # another recipient, sender or network is a new triplet
    for ip, s, r in [("198.51.100.7", "a@sender.test", "other@example.org"),
                     ("198.51.100.7", "b@sender.test", "u@example.org"),
                     ("203.0.113.7", "a@sender.test", "u@example.org")]:
        _, v = await rcpt(pipe, ip, s, r)
        assert v.action is Action.TEMPFAIL, (ip, s, r)


async def test_only_the_greylisted_recipients_are_deferred_in_a_scan(grey):
    pipe = await grey('reputation.lists.allow_senders=["a@sender.test"]')
    r = await pipe.scan(MSG, "a@sender.test", ["u@example.org"], smtp("198.51.100.8"))
    assert r.action is Action.ACCEPT  # allow-listed sender: never greylisted
    r = await pipe.scan(MSG, "b@sender.test", ["u@example.org"], smtp("198.51.100.8"))
    assert r.outcomes["u@example.org"].action is Action.TEMPFAIL


async def test_retry_after_the_window_starts_over(grey):
    pipe = await grey("greylist.retry_window=1s", "greylist.delay=0s")
    _, v = await rcpt(pipe, "198.51.100.9", "a@sender.test", "u@example.org")
    assert v.action is Action.TEMPFAIL
    await asyncio.sleep(1.2)  # the first attempt expired with the window
    _, v = await rcpt(pipe, "198.51.100.9", "a@sender.test", "u@example.org")
    assert v.action is Action.TEMPFAIL


async def test_network_is_auto_allowed_after_n_successful_retries(grey):
    pipe = await grey("greylist.auto_allow_after=2", "greylist.delay=0s")
    for sender in ("a@s.test", "b@s.test"):
        _, v = await rcpt(pipe, "198.51.100.10", sender, "u@example.org")
        assert v.action is Action.TEMPFAIL
        _, v = await rcpt(pipe, "198.51.100.10", sender, "u@example.org")
        assert v.action is not Action.TEMPFAIL
    _, v = await rcpt(pipe, "198.51.100.11", "new@other.test", "x@example.org")
    assert v.action is not Action.TEMPFAIL  # whole /24 allowed now


async def test_authenticated_local_and_batv_senders(grey):
    pipe = await grey("greylist.delay=0s")
    _, v = await rcpt(pipe, "198.51.100.12", "a@s.test", "u@example.org", auth="alice")
    assert v.action is not Action.TEMPFAIL
    _, v = await rcpt(pipe, "127.0.0.1", "a@s.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL
    # BATV tags change per message: the retry with a new tag is the same triplet
    _, v = await rcpt(pipe, "198.51.100.12", "prvs=1234abcd=bob@s.test", "u@example.org")
    assert v.action is Action.TEMPFAIL
    _, v = await rcpt(pipe, "198.51.100.12", "prvs=9999ffff=bob@s.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL


async def test_clients_with_good_reputation_skip_greylisting(grey):
    pipe = await grey("reputation.min_messages=3")
    store = pipe.services.store
    from filterd.reputation import ReputationModel

    model = ReputationModel({})
    for _ in range(3):
        await model.record(store, "203.0.113.30", "", "ham")
    _, v = await rcpt(pipe, "203.0.113.30", "a@s.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL
    pipe2 = await grey("reputation.min_messages=3", "greylist.skip_good_reputation=false")
    _, v = await rcpt(pipe2, "203.0.113.31", "a@s.test", "u@example.org")
    assert v.action is Action.TEMPFAIL


async def test_greylisting_is_off_by_default_and_in_filterd_check(pipeline_factory,
                                                                  store_overrides):
    pipe = await pipeline_factory(*store_overrides)
    _, v = await rcpt(pipe, "198.51.100.13", "a@s.test", "u@example.org")
    assert v.action is not Action.TEMPFAIL
    pipe = await pipeline_factory(*store_overrides, "greylist.enabled=true")
    r = await pipe.scan(MSG, "a@s.test", ["u@example.org"], Session(peer_ip="198.51.100.13"))
    assert r.action is Action.ACCEPT  # front door "check": dry run


async def test_a_passed_triplet_is_remembered_on_the_node_for_local_cache(grey):
    """After a pass the node answers from its own memory for ``local_cache``: a triplet deleted
    from the store meanwhile still passes there (a node without the cache defers it at once),
    and is greylisted again once the memory has expired."""
    a = await grey("greylist.local_cache=500ms")
    b = await grey("greylist.local_cache=0s")
    triplet = ("198.51.100.77", "c@sender.test", "u@example.org")
    _, v = await rcpt(a, *triplet)
    assert v.action is Action.TEMPFAIL
    await asyncio.sleep(1.1)
    _, v = await rcpt(a, *triplet)
    assert v.action is not Action.TEMPFAIL  # passed: remembered on node a
    store = a.services.store
    await store.delete(*await store.keys("grey:t:"))  # an operator clears the triplets
    _, v = await rcpt(b, *triplet)
    assert v.action is Action.TEMPFAIL  # the store has forgotten it
    _, v = await rcpt(a, *triplet)
    assert v.action is not Action.TEMPFAIL  # node a still remembers the pass
    await asyncio.sleep(0.6)
    await store.delete(*await store.keys("grey:t:"))  # (b's new first attempt too)
    _, v = await rcpt(a, *triplet)
    assert v.action is Action.TEMPFAIL  # its memory expired: asks the store again
