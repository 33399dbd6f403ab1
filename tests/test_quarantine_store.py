"""The quarantine store and its policies: shared index across nodes (Redis), retention and
purge, digest frequency and "only new entries", admin summary, allow/block lists in decide,
site templates, learning released mail as ham."""
from __future__ import annotations

import os
import time
import uuid

import pytest
from quarantine_support import Sink, overrides, quarantine_message, spam_message, unmarked

from filterd.quarantine.store import MessageMissing
from filterd.reports.digest import run_reports
from filterd.store.redis import RedisStore


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
async def redis_prefix():
    prefix = f"filterd-test-{uuid.uuid4().hex}:"
    yield prefix
    r = RedisStore("redis://127.0.0.1:6379/0", prefix=prefix)
    for k in await r.keys(""):
        await r.delete(k)
    await r.close()


@pytest.mark.parametrize("share", [True, False])
async def test_redis_index_lets_another_node_release(pipeline_factory, sink, tmp_path,
                                                     redis_prefix, share):
    def node(name):
        return [*overrides(sink.port), f"quarantine.share_messages={str(share).lower()}",
                f"quarantine.directory={tmp_path / name}"]

    store_a = RedisStore("redis://127.0.0.1:6379/0", prefix=redis_prefix)
    store_b = RedisStore("redis://127.0.0.1:6379/0", prefix=redis_prefix)
    a = await pipeline_factory(*node("node-a"), store=store_a)
    b = await pipeline_factory(*node("node-b"), store=store_b)
    raw = spam_message(subject="held on node a")
    await quarantine_message(a, raw, "s@spam.example", ["bob@example.org"])
    qb = b.services.extra["quarantine"]
    [entry] = await qb.qstore.entries_for("bob@example.org")  # node b sees node a's entry
    token = qb.token("release", entry)
    entry_b, action = await qb.entry_for_token(token)  # and verifies a's tokens (same secret)
    if share:
        await qb.perform(entry_b, action)
        got = await sink.wait_for(lambda m: m.message["Subject"] == "held on node a")
        assert unmarked(got.data) == raw
        assert await a.services.extra["quarantine"].qstore.entries_for("bob@example.org") == []
    else:
        with pytest.raises(MessageMissing, match="not on this node"):
            await qb.perform(entry_b, action)
        # the failed attempt did not burn the link: node a can still use it
        qa = a.services.extra["quarantine"]
        entry_a, _ = await qa.entry_for_token(token)
        await qa.perform(entry_a, "release")
        await sink.wait_for(lambda m: m.message["Subject"] == "held on node a")


async def test_retention_purges_entries_and_files(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port), "quarantine.retention=2d")
    q = pipe.services.extra["quarantine"].qstore
    await quarantine_message(pipe, spam_message(), "s@spam.example", ["bob@example.org"])
    [e] = await q.entries_for("bob@example.org")
    assert os.path.exists(e.path) and e.expires == pytest.approx(e.received_at + 2 * 86400)
    assert await q.purge(now=time.time() + 86400) == 0
    assert await q.purge(now=time.time() + 3 * 86400) == 1
    assert not os.path.exists(e.path)
    assert await q.all_entries() == []


async def test_digest_frequency_and_only_new_entries(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="first"), "s@spam.example",
                             ["daily@example.org", "hourly@example.org", "never@example.org",
                              "weekly@example.org"])
    await service.qstore.set_prefs("hourly@example.org", {"frequency": "hourly"})
    await service.qstore.set_prefs("never@example.org", {"frequency": "never"})
    await service.qstore.set_prefs("weekly@example.org", {"frequency": "weekly"})
    t0 = time.time()
    sent = await run_reports(service, send=True, now=t0)
    assert sorted(d.to for d in sent) == ["daily@example.org", "hourly@example.org",
                                          "weekly@example.org"]
    # a dry run changes nothing; a real run right after has nothing due
    assert await run_reports(service, send=False, now=t0 + 10) == []
    await quarantine_message(pipe, spam_message(subject="second"), "s@spam.example",
                             ["daily@example.org", "hourly@example.org", "weekly@example.org"])
    assert [d.to for d in await run_reports(service, send=True, now=t0 + 3600)] == [
        "hourly@example.org"]
    sent = await run_reports(service, send=True, now=t0 + 86400)
    assert [d.to for d in sent] == ["daily@example.org"]
    assert [e.subject for e in sent[0].entries] == ["second"]  # only what is new for them
    assert "first" not in sent[0].text
    sent = await run_reports(service, send=True, now=t0 + 7 * 86400)
    assert [d.to for d in sent] == ["weekly@example.org"]
    digests = sink.matching(lambda m: m.rcpt_tos == ["hourly@example.org"])
    assert len(digests) == 2


async def test_admin_summary_lists_every_recipient(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port),
                                  "quarantine.digest.admin_address=postmaster@example.org")
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="<b>bold</b>"), "s@spam.example",
                             ["a@example.org", "b@example.org"])
    sent = await run_reports(service, send=True)
    admin = [d for d in sent if d.admin]
    assert [d.to for d in admin] == ["postmaster@example.org"]
    assert "a@example.org" in admin[0].text and "b@example.org" in admin[0].text
    assert "&lt;b&gt;bold&lt;/b&gt;" in admin[0].html and "<b>bold" not in admin[0].html
    got = await sink.wait_for(lambda m: m.rcpt_tos == ["postmaster@example.org"])
    assert "2 new" in got.message["Subject"]


async def test_allow_and_block_senders_apply_in_decide(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(sender="friend@list.example"),
                             "friend@list.example", ["bob@example.org"])
    await quarantine_message(pipe, spam_message(sender="foe@spam.example"),
                             "foe@spam.example", ["bob@example.org"])
    entries = {e.sender: e for e in await service.qstore.entries_for("bob@example.org")}
    await service.perform(entries["friend@list.example"], "allow")
    await service.perform(entries["foe@spam.example"], "block")
    assert await sink.wait_for(lambda m: m.mail_from == "friend@list.example")
    assert await service.qstore.entries_for("bob@example.org") == []

    r = await pipe.scan(spam_message(sender="friend@list.example"), "friend@list.example",
                        ["bob@example.org", "other@example.org"])
    assert r.outcomes["bob@example.org"].action.value == "accept"
    assert r.outcomes["other@example.org"].action.value == "quarantine"  # only bob's list
    r = await pipe.scan(spam_message(subject="hi", sender="foe@spam.example").replace(
        b"XJS*", b"nothing "), "foe@spam.example", ["bob@example.org"])
    assert r.outcomes["bob@example.org"].action.value == "reject"


async def test_site_templates_override_shipped_ones(pipeline_factory, sink, tmp_path):
    site = tmp_path / "templates"
    site.mkdir()
    (site / "digest.txt.j2").write_text("SITE DIGEST for {{ recipient }}: "
                                        "{% for e in entries %}{{ e.subject }} {% endfor %}\n")
    pipe = await pipeline_factory(*overrides(sink.port),
                                  f"quarantine.digest.template_dir={site}")
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="zzz"), "s@spam.example",
                             ["bob@example.org"])
    [d] = await run_reports(service, send=False)
    assert d.text.startswith("SITE DIGEST for bob@example.org: zzz")
    assert "<table" in d.html  # the shipped HTML template is still used


async def test_site_template_cannot_escape_the_sandbox(pipeline_factory, sink, tmp_path):
    import jinja2.exceptions

    site = tmp_path / "templates"
    site.mkdir()
    (site / "digest.txt.j2").write_text("{{ recipient.__class__.__mro__[1].__subclasses__() }}")
    pipe = await pipeline_factory(*overrides(sink.port), f"quarantine.digest.template_dir={site}")
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(), "s@spam.example", ["bob@example.org"])
    with pytest.raises(jinja2.exceptions.SecurityError):
        await run_reports(service, send=False)


async def test_released_mail_is_offered_to_bayes_as_ham(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    service = pipe.services.extra["quarantine"]
    learned = []
    pipe.services.extra["learn"] = lambda data, kind: learned.append((kind, data))
    raw = spam_message(subject="ham after all")
    await quarantine_message(pipe, raw, "s@spam.example", ["bob@example.org"])
    [e] = await service.qstore.entries_for("bob@example.org")
    await service.perform(e, "release")
    assert learned == [("ham", raw)]


async def test_hold_fires_quarantined_event_per_recipient(pipeline_factory, sink, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "record_q.py").write_text(
        "from filterd.hookspecs import hookimpl\n"
        "EVENTS = []\n"
        "@hookimpl\n"
        "def quarantined(ctx, recipient, reason):\n"
        "    EVENTS.append((recipient, reason))\n")
    pipe = await pipeline_factory(*overrides(sink.port), f"plugins.site_dir={site}")
    await quarantine_message(pipe, spam_message(), "s@spam.example",
                             ["a@example.org", "b@example.org"])
    import sys
    events = sys.modules["filterd_site_record_q"].EVENTS
    assert sorted(r for r, _ in events) == ["a@example.org", "b@example.org"]
    assert all("spam score" in why for _, why in events)
