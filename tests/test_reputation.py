"""Reputation from past verdicts and allow/block lists, against both store backends."""
from __future__ import annotations

import time

import pytest
from conftest import GTUBE, make_message

# fixtures: store, backend, store_overrides, redis_prefix, own_redis (tests/store_fixtures.py)
pytest_plugins = ["store_fixtures"]

from filterd.model import Session
from filterd.reputation import ListPolicy, ReputationModel, client_network

HAM = make_message()
SPAM = make_message(body=f"Buy now\r\n{GTUBE}\r\n", subject="offer")


def smtp(ip: str, auth: str = "") -> Session:
    return Session(peer_ip=ip, auth_user=auth, front_door="smtp")


@pytest.fixture
async def rep_pipe(pipeline_factory, store_overrides):
    async def make(*extra):
        return await pipeline_factory(*store_overrides, "reputation.domain_good_requires=[]",
                                      *extra)
    return make


def names(result, rcpt=None):
    return {s.name for s in result.ctx.all_symbols(rcpt)}


async def test_spam_history_makes_ip_network_and_domain_bad(rep_pipe):
    pipe = await rep_pipe()
    for _ in range(5):
        r = await pipe.scan(SPAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.7"))
        assert r.action.value == "reject"
    r = await pipe.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.7"))
    assert {"REP_IP_BAD", "REP_NET_BAD", "REP_DOMAIN_BAD"} <= names(r)
    ip_sym = next(s for s in r.ctx.symbols if s.name == "REP_IP_BAD")
    assert ip_sym.score == 3.0 and "198.51.100.7" in ip_sym.options
    # a neighbour in the same /24 with another sender domain: only the network is bad
    r = await pipe.scan(HAM, "a@other.test", ["u@example.org"], smtp("198.51.100.99"))
    assert names(r) & {"REP_IP_BAD", "REP_NET_BAD", "REP_DOMAIN_BAD"} == {"REP_NET_BAD"}
    # another network: nothing
    r = await pipe.scan(HAM, "a@other.test", ["u@example.org"], smtp("203.0.113.5"))
    assert not any(n.startswith("REP_") for n in names(r))


async def test_ham_history_makes_good_and_good_domain_needs_authentication(
        pipeline_factory, store_overrides):
    pipe = await pipeline_factory(*store_overrides)  # default domain_good_requires
    for _ in range(5):
        await pipe.scan(HAM, "news@good.test", ["u@example.org"], smtp("203.0.113.20"))
    r = await pipe.scan(HAM, "news@good.test", ["u@example.org"], smtp("203.0.113.20"))
    assert {"REP_IP_GOOD", "REP_NET_GOOD"} <= names(r)
    assert "REP_DOMAIN_GOOD" not in names(r)  # no SPF/DKIM/DMARC pass: could be forged
    assert r.score < 0


async def test_good_domain_counts_when_authenticity_is_not_required(rep_pipe):
    pipe = await rep_pipe()
    for _ in range(5):
        await pipe.scan(HAM, "news@good.test", ["u@example.org"], smtp("203.0.113.21"))
    r = await pipe.scan(HAM, "news@good.test", ["u@example.org"], smtp("192.0.2.200"))
    assert "REP_DOMAIN_GOOD" in names(r) and "REP_IP_GOOD" not in names(r)


async def test_own_symbols_do_not_feed_back_into_learning(rep_pipe, pipeline_factory):
    pipe = await rep_pipe()
    for _ in range(5):
        await pipe.scan(SPAM, "x@spam.test", ["u@example.org"], smtp("198.51.100.50"))
    # the bad standing alone (3 + 1.5 + 2 = 6.5) would tag these hams; they still count as ham
    r = await pipe.scan(HAM, "x@spam.test", ["u@example.org"], smtp("198.51.100.50"))
    assert r.action.value == "add_header"
    await pipe.host.pm.get_plugin("reputation").flush()  # written behind: write them now
    store = pipe.services.store
    counts = ReputationModel({}).decay(await store.hgetall("rep:ip:198.51.100.50"), time.time())
    assert round(counts["ham"]) == 1 and round(counts["rejected"]) == 5


async def test_learning_is_written_behind_in_one_round_trip_and_seen_at_once_locally(
        rep_pipe, monkeypatch):
    pipe = await rep_pipe("reputation.learn_flush=1h")  # no timer flush during the test
    store = pipe.services.store
    writes = []
    real = type(store).mhincr

    async def counting(self, items, ttl=None):
        writes.append(dict(items))
        return await real(self, items, ttl)
    monkeypatch.setattr(type(store), "mhincr", counting)
    for _ in range(5):
        await pipe.scan(SPAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.17"))
    # nothing written yet, but this node already judges from what it learnt
    assert writes == [] and await store.keys("rep:") == []
    r = await pipe.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.17"))
    assert "REP_IP_BAD" in names(r)
    # a clean stop writes everything, one round trip for the six messages' three subjects
    await pipe.host.shutdown()
    assert len(writes) == 1 and set(writes[0]) == {
        "rep:ip:198.51.100.17", "rep:net:198.51.100.0/24", "rep:dom:spammer.test"}
    counts = ReputationModel({}).decay(await store.hgetall("rep:ip:198.51.100.17"), time.time())
    assert round(counts["rejected"]) == 5 and round(counts["ham"]) == 1


async def test_learnt_counts_reach_the_store_after_the_flush_interval(rep_pipe):
    import asyncio

    pipe = await rep_pipe("reputation.learn_flush=50ms")
    await pipe.scan(SPAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.18"))
    store = pipe.services.store
    for _ in range(200):  # another node would see it from here on
        if await store.keys("rep:ip:198.51.100.18"):
            break
        await asyncio.sleep(0.02)
    assert await store.keys("rep:ip:198.51.100.18") == ["rep:ip:198.51.100.18"]


async def test_a_node_uses_its_cached_standings_and_sees_other_nodes_after_the_ttl(
        pipeline_factory, store_overrides):
    import asyncio

    common = (*store_overrides, "reputation.domain_good_requires=[]", "reputation.cache=500ms")
    a = await pipeline_factory(*common, "reputation.learn_flush=0s")
    b = await pipeline_factory(*common, "reputation.learn=false")  # b only reads
    r = await b.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.31"))
    assert not any(n.startswith("REP_") for n in names(r))  # b has now cached "no history"
    for _ in range(5):
        await a.scan(SPAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.31"))
    # the learning node judges from its own counts at once (its cached rows include them)
    r = await a.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.31"))
    assert "REP_IP_BAD" in names(r)
    r = await b.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.31"))
    assert "REP_IP_BAD" not in names(r)  # still its cached standing
    await asyncio.sleep(0.6)
    r = await b.scan(HAM, "bulk@spammer.test", ["u@example.org"], smtp("198.51.100.31"))
    assert "REP_IP_BAD" in names(r)  # read again after the TTL


async def test_counts_decay_with_age(store):
    model = ReputationModel({"half_life": "7d", "min_messages": 5})
    now = time.time()
    for _ in range(10):
        await model.record(store, "198.51.100.9", "s@old.test", "spam", now - 14 * 86400)
    st = (await model.lookup(store, "198.51.100.9", "s@old.test", now))["ip"]
    assert st.bad == pytest.approx(2.5, rel=0.05)  # two half-lives
    assert model.judge(st) is None  # below min_messages after decay
    for _ in range(10):
        await model.record(store, "198.51.100.9", "s@old.test", "spam", now)
    st = (await model.lookup(store, "198.51.100.9", "s@old.test", now))["ip"]
    assert model.judge(st) == "bad"


async def test_buckets_past_max_age_are_ignored_and_pruned(store):
    model = ReputationModel({"max_age": "30d", "bucket": "1d"})
    now = time.time()
    await model.record(store, "198.51.100.10", "", "spam", now - 40 * 86400)
    await model.record(store, "198.51.100.10", "", "ham", now)
    st = (await model.lookup(store, "198.51.100.10", "", now))["ip"]
    assert st.counts == {"ham": 1.0}
    assert all(f.startswith("ham:") for f in await store.hgetall("rep:ip:198.51.100.10"))


async def test_authenticated_and_local_mail_is_not_learnt(rep_pipe):
    pipe = await rep_pipe()
    await pipe.scan(SPAM, "me@example.org", ["x@remote.test"], smtp("198.51.100.60", auth="me"))
    await pipe.scan(SPAM, "me@example.org", ["x@remote.test"], smtp("127.0.0.1"))
    await pipe.host.pm.get_plugin("reputation").flush()
    assert await pipe.services.store.keys("rep:") == []


async def test_filterd_check_is_a_dry_run_unless_in_check(pipeline_factory, store_overrides):
    pipe = await pipeline_factory(*store_overrides)
    await pipe.scan(SPAM, "a@b.test", ["u@example.org"], Session(peer_ip="198.51.100.70"))
    await pipe.host.pm.get_plugin("reputation").flush()
    assert await pipe.services.store.keys("rep:") == []
    pipe2 = await pipeline_factory(*store_overrides, "reputation.in_check=true")
    await pipe2.scan(SPAM, "a@b.test", ["u@example.org"], Session(peer_ip="198.51.100.70"))
    await pipe2.host.pm.get_plugin("reputation").flush()
    assert "rep:ip:198.51.100.70" in await pipe2.services.store.keys("rep:")


# -- allow/block lists ---------------------------------------------------------------------------
async def test_global_block_list_rejects_with_the_configured_reply(rep_pipe):
    pipe = await rep_pipe('reputation.lists.block_ips=["198.51.100.0/24"]',
                          'reputation.lists.block_senders=["spam.test"]')
    r = await pipe.scan(HAM, "a@x.test", ["u@example.org"], smtp("198.51.100.1"))
    o = r.outcomes["u@example.org"]
    assert o.action.value == "reject" and o.verdict.smtp_reply()[0] == 550
    assert "block-listed (global: 198.51.100.0/24)" in o.verdict.reason
    r = await pipe.scan(HAM, "a@mail.spam.test", ["u@example.org"], smtp("203.0.113.1"))
    assert r.action.value == "reject" and "spam.test" in r.outcomes["u@example.org"].verdict.reason


async def test_allow_lists_win_over_bad_reputation_and_scores(rep_pipe):
    pipe = await rep_pipe('reputation.lists.allow_senders=["partner.test"]')
    for _ in range(5):
        await pipe.scan(SPAM, "x@partner.test", ["u@example.org"], smtp("198.51.100.80"))
    r = await pipe.scan(SPAM, "x@partner.test", ["u@example.org"], smtp("198.51.100.80"))
    assert r.outcomes["u@example.org"].action.value == "accept"
    assert "ALLOWLISTED" in names(r, "u@example.org")


async def test_per_recipient_and_per_domain_lists(pipeline_factory, store_overrides, tmp_path):
    conf = tmp_path / "filterd.toml"
    conf.write_text('[reputation.lists]\nblock_ips = ["203.0.113.0/24"]\n'
                    '[reputation.recipients."ceo@example.org"]\nallow_ips = ["203.0.113.9"]\n'
                    '[reputation.domains."example.net"]\nblock_senders = ["@news.test"]\n')
    pipe = await pipeline_factory(*store_overrides, config=str(conf))
    r = await pipe.scan(HAM, "a@x.test", ["ceo@example.org", "bob@example.org"],
                        smtp("203.0.113.9"))
    assert r.outcomes["ceo@example.org"].action.value == "accept"  # recipient beats global
    assert r.outcomes["bob@example.org"].action.value == "reject"
    r = await pipe.scan(HAM, "n@news.test", ["a@example.net", "a@example.org"],
                        smtp("192.0.2.44"))
    assert r.outcomes["a@example.net"].action.value == "reject"
    assert r.outcomes["a@example.org"].action.value == "accept"


async def test_allow_list_never_overrides_another_plugins_verdict(rep_pipe, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_av.py").write_text(
        "from filterd.hookspecs import hookimpl\n"
        "from filterd.verdict import Verdict\n"
        "@hookimpl\n"
        "def data(ctx, message):\n"
        "    ctx.add_symbol('VIRUS_FOUND', 0.0)\n"
        "    return Verdict.reject('virus found', code=554, enhanced='5.7.0')\n")
    pipe = await rep_pipe(f"plugins.site_dir={site}",
                          'reputation.lists.allow_ips=["192.0.2.0/24"]')
    r = await pipe.scan(HAM, "a@x.test", ["u@example.org"], smtp("192.0.2.5"))
    assert r.outcomes["u@example.org"].action.value == "reject"
    assert r.outcomes["u@example.org"].verdict.reason == "virus found"


def test_list_policy_levels_and_block_beats_allow_within_a_level():
    lp = ListPolicy({"lists": {"allow_ips": ["192.0.2.0/24"], "block_ips": ["192.0.2.7"]},
                     "domains": {"example.org": {"allow_senders": ["friend@x.test"]}}})
    assert lp.check("192.0.2.7", "", "a@example.com").kind == "block"
    assert lp.check("192.0.2.8", "", "a@example.com").kind == "allow"
    hit = lp.check("192.0.2.7", "Friend@X.test", "a@example.org")
    assert (hit.kind, hit.level) == ("allow", "domain example.org")
    assert lp.check("::ffff:192.0.2.7", "", None).kind == "block"
    assert lp.check("198.51.100.1", "friend@x.test", "a@example.com") is None


def test_client_networks():
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("bogus") == "bogus"


async def test_ipv6_clients_share_the_reputation_of_their_64(rep_pipe):
    pipe = await rep_pipe()
    for _ in range(5):
        await pipe.scan(SPAM, "x@v6spam.test", ["u@example.org"], smtp("2001:db8:5:6::7"))
    r = await pipe.scan(HAM, "y@other.test", ["u@example.org"], smtp("2001:db8:5:6:ffff::1"))
    net = next(s for s in r.ctx.symbols if s.name == "REP_NET_BAD")
    assert "2001:db8:5:6::/64" in net.options and "REP_IP_BAD" not in names(r)
    r = await pipe.scan(HAM, "y@other.test", ["u@example.org"], smtp("2001:db8:5:7::1"))
    assert not any(n.startswith("REP_") for n in names(r))
