"""The token store on both backends: the same training gives the same probabilities (real Redis
on 127.0.0.1:6379 under a unique key prefix), learning is counted once, relearning moves a
message, forgetting undoes it."""
from __future__ import annotations

import math
import uuid
from array import array

import pytest

from filterd.bayes import Bayes, linear
from filterd.bayes.classifier import Params, chi2q, classify
from filterd.store.sqlite import SQLiteStore

from bayes_helpers import synth


@pytest.fixture
async def redis_store():
    from filterd.store.redis import RedisStore

    store = RedisStore("redis://127.0.0.1:6379/0", prefix=f"filterd-test-{uuid.uuid4().hex}:")
    try:
        await store.ping()
    except Exception as exc:  # noqa: BLE001
        await store.close()
        pytest.fail(f"Redis on 127.0.0.1:6379 is required for this test: {exc}")
    yield store
    keys = await store.keys("")
    if keys:
        await store.delete(*keys)
    await store.close()


async def train(bayes: Bayes, n: int = 30):
    await bayes.learn([synth("spam", i) for i in range(n)], spam=True, batch=7)
    await bayes.learn([synth("ham", i) for i in range(n)], spam=False, batch=7)


async def test_sqlite_and_redis_give_identical_results(tmp_path, redis_store):
    a = Bayes(SQLiteStore(tmp_path / "t.sqlite"))
    b = Bayes(redis_store)
    await train(a)
    await train(b)
    assert await a.tokens.totals() == await b.tokens.totals() == (30, 30)
    assert await a.tokens.all_tokens() == await b.tokens.all_tokens()
    for kind in ("spam", "ham"):
        for i in range(100, 110):
            m = synth(kind, i, seed=99)
            pa, pb = (await a.classify(m)).probability, (await b.classify(m)).probability
            assert pa == pb
            assert (pa > 0.9) if kind == "spam" else (pa < 0.1)
    await a.tokens.store.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_learning_twice_counts_once_and_relearning_moves(tmp_path, redis_store, backend):
    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    bayes = Bayes(store)
    m = synth("spam", 1)
    assert (await bayes.learn([m], spam=True)).learned == 1
    assert (await bayes.learn([m], spam=True)).already == 1
    before = await bayes.tokens.all_tokens()
    assert (await bayes.tokens.totals()) == (1, 0)
    assert (await bayes.learn([m], spam=False)).relearned == 1
    assert (await bayes.tokens.totals()) == (0, 1)
    after = await bayes.tokens.all_tokens()
    assert set(before) == set(after)
    assert all(s == 1 and h == 0 for s, h in before.values())
    assert all(s == 0 and h == 1 for s, h in after.values())
    assert await bayes.forget(m) is True
    assert (await bayes.tokens.totals()) == (0, 0)
    assert await bayes.tokens.all_tokens() == {}
    assert await bayes.forget(m) is False


def test_chi2q_matches_known_values():
    # P(chi2 >= 2 | 2 dof) = e^-1 ; P(chi2 >= 4 | 4 dof) = e^-2 (1 + 2)
    assert math.isclose(chi2q(2.0, 2), math.exp(-1))
    assert math.isclose(chi2q(4.0, 4), 3 * math.exp(-2))
    assert chi2q(0.0, 10) == 1.0


def test_classifier_bands_strong_weak_and_conflicting_evidence():
    spammy = {f"s{i}": (90, 1) for i in range(20)}
    hammy = {f"h{i}": (1, 90) for i in range(20)}
    assert classify(spammy, 100, 100).probability > 0.99
    assert classify(hammy, 100, 100).probability < 0.01
    both = classify({**spammy, **hammy}, 100, 100).probability
    assert 0.3 < both < 0.7  # contradictory evidence is unsure, not confident
    assert classify({}, 100, 100).probability == 0.5
    assert classify(spammy, 0, 100).probability == 0.5  # untrained says nothing
    # rare tokens are pulled toward the prior: one sighting is weak evidence
    prior = Params(robs=1.0)
    weak = classify({"x": (1, 0)}, 100, 100, prior).probability
    strong = classify({"x": (50, 0)}, 100, 100, prior).probability
    assert 0.5 < weak < strong


async def test_a_change_by_another_node_empties_the_token_cache(redis_store):
    from filterd.store.redis import RedisStore

    other = RedisStore("redis://127.0.0.1:6379/0", prefix=redis_store.prefix)
    try:
        node_a, node_b = Bayes(redis_store), Bayes(other)
        await train(node_b, 10)
        probe = synth("ham", 500, seed=11).replace(b"Subject: ", b"Subject: frobnicate ")
        first = await node_a.classify(probe)
        assert node_a._fcache  # token probabilities are cached on node A now
        # node B learns the probe as spam many times over (distinct copies)
        await node_b.learn([probe.replace(b"Message-ID: <", b"Message-ID: <%d" % i)
                            for i in range(40)], spam=True)
        second = await node_a.classify(probe)
        assert second.probability > first.probability + 0.3
    finally:
        await other.close()



async def test_one_more_learned_message_keeps_the_token_cache_a_large_change_empties_it(
        redis_store):
    """Autolearn learns most clean mail: one more message must not make every node look all of
    a message's tokens up again; a change beyond cache_drift (or an old cache) must."""
    from filterd.store.redis import RedisStore

    other = RedisStore("redis://127.0.0.1:6379/0", prefix=redis_store.prefix)
    try:
        node_a, node_b = Bayes(redis_store, cache_drift=0.01), Bayes(other)
        await node_b.learn([synth("spam", i) for i in range(150)], spam=True, batch=50)
        await node_b.learn([synth("ham", i) for i in range(150)], spam=False, batch=50)
        lookups = []
        packed = node_a.tokens.packed

        async def counting(tokens):
            lookups.append(len(tokens))
            return await packed(tokens)

        node_a.tokens.packed = counting
        probe = synth("ham", 7, seed=5)
        await node_a.classify(probe)
        assert lookups, "the first classification looks the tokens up"
        lookups.clear()
        await node_b.learn([synth("ham", 1, seed=77)], spam=False)  # +1 ham: 0.7 % drift
        await node_a.classify(probe)
        assert lookups == []  # served from the cache
        await node_b.learn([synth("ham", i, seed=78) for i in range(5)], spam=False)  # > 1 %
        await node_a.classify(probe)
        assert lookups and lookups[0] > 10  # the whole message was looked up again
        lookups.clear()
        node_a.cache_age = 0.0  # an old cache is started again whatever the drift
        await node_b.learn([synth("spam", 1, seed=79)], spam=True)
        await node_a.classify(probe)
        assert lookups and lookups[0] > 10
        lookups.clear()
        node_a.cache_age, node_a.cache_drift = 300.0, 0.0  # drift 0: any change empties it,
        assert await node_b.forget(synth("ham", 1, seed=77))  # even one that leaves the counts
        await node_b.learn([synth("ham", 2, seed=77)], spam=False)  # as they were
        await node_a.classify(probe)
        assert lookups and lookups[0] > 10
    finally:
        await other.close()

def test_evidence_counts_as_at_most_n_eff_tokens():
    # the tokens of one message are not independent: beyond n_eff tokens the mean evidence
    # decides, not the length (plain Fisher, n_eff=0, grows more certain with length alone)
    def weak_ham(n):
        return {f"h{i}": (25, 75) for i in range(n)}

    capped = [classify(weak_ham(n), 100, 100, Params(n_eff=50)).probability for n in (60, 600)]
    plain = [classify(weak_ham(n), 100, 100, Params(n_eff=0)).probability for n in (60, 600)]
    assert capped[0] == pytest.approx(capped[1], abs=1e-9)
    assert plain[1] < plain[0] / 10
    few = {f"s{i}": (60, 1) for i in range(10)}  # below n_eff tokens nothing changes
    assert classify(few, 100, 100, Params(n_eff=50)).probability == \
        classify(few, 100, 100, Params(n_eff=0)).probability


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_database_learned_with_an_older_tokenizer_is_reported(tmp_path, redis_store,
                                                                       backend, caplog):
    from filterd.bayes.store import FORMAT_FIELD

    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    bayes = Bayes(store)
    await train(bayes, 10)
    nspam, nham, _ = await bayes.tokens.state()
    assert (nspam, nham) == (10, 10) and bayes.tokens.outdated(nspam, nham) == 0
    # a database from before the format marker: the counter is missing
    await store.mhincr({bayes.tokens.k_meta: {FORMAT_FIELD: -20}})
    nspam, nham, _ = await bayes.tokens.state()
    assert bayes.tokens.outdated(nspam, nham) == 20
    with caplog.at_level("WARNING", logger="filterd.bayes"):
        await Bayes(store).classify(synth("spam", 99))
    assert "older tokenizer" in caplog.text and "train --reset" in caplog.text
    # retraining from scratch clears the warning
    await bayes.tokens.clear()
    await train(bayes, 10)
    nspam, nham, _ = await bayes.tokens.state()
    assert bayes.tokens.outdated(nspam, nham) == 0
    if backend == "sqlite":
        await store.close()


async def test_engine_fast_path_agrees_with_the_reference_classifier(tmp_path):
    from filterd.bayes import tokenize

    store = SQLiteStore(tmp_path / "t.sqlite")
    try:
        bayes = Bayes(store)
        await train(bayes, 20)
        nspam, nham, _ = await bayes.tokens.state()
        for probe in (synth("spam", 300, seed=3), synth("ham", 300, seed=3)):
            counts = await bayes.tokens.counts(tokenize(probe))
            want = classify(counts, nspam, nham, bayes.params).probability
            res = await bayes.classify(probe)
            assert res.fisher == pytest.approx(want, abs=1e-12)  # (before the linear mix)
            assert res.probability == linear.mix(res.fisher, res.margin)
    finally:
        await store.close()


async def test_the_database_state_is_read_again_only_after_a_write_from_anywhere(tmp_path):
    """The per-message read of the message counts is skipped while SQLite says nothing was
    committed since: by this connection (its own learning) or by another one (another process:
    `filterd bayes train`, another milter worker)."""
    path = tmp_path / "bayes.sqlite"
    mine, other = SQLiteStore(path), SQLiteStore(path)
    try:
        a, b = Bayes(mine), Bayes(other)
        assert await a.tokens.state() == (0, 0, 0)
        reads = []
        real = mine.hget_many

        async def counting(key, fields):
            if key == a.tokens.k_meta:  # (learning reads the seen-index too)
                reads.append(key)
            return await real(key, fields)

        mine.hget_many = counting
        assert (await a.tokens.state())[:2] == (0, 0)
        assert reads == []  # nothing written: the counts it read are kept
        await b.learn([synth("spam", 1), synth("spam", 2)], spam=True)  # the other connection
        assert (await a.tokens.state())[:2] == (2, 0)
        assert len(reads) == 1
        await a.learn([synth("ham", 1)], spam=False)  # its own connection
        assert (await a.tokens.state())[:2] == (2, 1)
        assert (await a.tokens.state())[:2] == (2, 1)
        assert len(reads) == 2
        await b.forget(synth("spam", 1))
        assert (await a.tokens.state())[:2] == (1, 1)
    finally:
        await mine.close()
        await other.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_presence_filter_spares_lookups_and_changes_no_probability(
        tmp_path, redis_store, backend):
    """Only tokens the presence filter says may have been learned are looked up: every
    learned one still is (the same probabilities as without the filter), and most of a new
    message's never-learned tokens are not."""
    from filterd.bayes import presence, tokenize

    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    bayes = Bayes(store)
    await train(bayes, 20)
    assert bayes.tokens.presence_complete
    bitmap = await bayes.tokens.presence()
    learned = list(await bayes.tokens.all_tokens())
    assert presence.may_hold(bitmap, learned) == learned
    looked_up = []
    real = store.hget_many

    async def counting(key, fields):
        if key == bayes.tokens.k_tokens:
            looked_up.extend(fields)
        return await real(key, fields)

    store.hget_many = counting
    probes = [synth(kind, i, seed=5) + b"\nunheardof%d zqxw%d\n" % (i, i)
              for kind in ("spam", "ham") for i in range(200, 210)]
    with_filter = [(await bayes.classify(p)).probability for p in probes]
    never = {t for p in probes for t in tokenize(p)} - set(learned)
    assert len(never) >= 40
    assert not never & set(looked_up)  # (no false positive among these few)
    plain = Bayes(store)
    plain.tokens.presence = _no_presence
    assert [(await plain.classify(p)).probability for p in probes] == with_filter
    if backend == "sqlite":
        await store.close()


async def _no_presence(into=None):
    return None


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_database_learned_before_the_presence_filter_gets_it_at_the_next_learn(
        tmp_path, redis_store, backend, caplog):
    """A token database from a filterd without the filter (no bitmap, no marker) is classified
    by looking every token up, and the next learn adds all its tokens to the filter, once."""
    from filterd.bayes import presence

    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    old = Bayes(store)
    await train(old, 10)
    learned = list(await old.tokens.all_tokens())
    await store.delete(old.tokens.k_presence)  # as an older filterd leaves it
    await store.hincr(old.tokens.k_meta, {presence.MARKER: -old.tokens.presence_epoch})
    probe = synth("spam", 77, seed=8)
    fresh = Bayes(store)
    before = (await fresh.classify(probe)).fisher
    assert not fresh.tokens.presence_complete and fresh._presence is None
    with caplog.at_level("INFO", logger="filterd.bayes"):
        await fresh.learn([synth("ham", 500, seed=8)], spam=False)
    assert f"from the {len(learned)} tokens learned before" in caplog.text
    assert fresh.tokens.presence_complete
    assert presence.may_hold(await fresh.tokens.presence(), learned) == learned
    caplog.clear()
    with caplog.at_level("INFO", logger="filterd.bayes"):
        await fresh.learn([synth("ham", 501, seed=8)], spam=False)
    assert "presence filter built" not in caplog.text  # once per database
    await fresh.forget(synth("ham", 500, seed=8))
    await fresh.forget(synth("ham", 501, seed=8))
    # (Fisher's part: a forget does not undo the linear model's steps)
    assert (await Bayes(store).classify(probe)).fisher == before
    await fresh.tokens.clear()  # a new, empty database gets a new filter
    assert await store.bitmap_get(fresh.tokens.k_presence) == b""
    await train(fresh, 3)
    assert fresh.tokens.presence_complete
    if backend == "sqlite":
        await store.close()


async def test_the_copy_of_the_presence_filter_is_read_again_only_after_another_writer(
        tmp_path):
    """A classifier's own learning adds its bits to its copy of the filter (its new tokens
    count at once, and the copy is not read again); a write by another node or process makes
    it read the filter again when its cache starts afresh."""
    path = tmp_path / "t.sqlite"
    mine, other = SQLiteStore(path), SQLiteStore(path)
    try:
        a = Bayes(mine, cache_drift=0)  # (any change starts the token cache afresh)
        b = Bayes(other)
        await train(a, 10)
        reads = []
        real = a.tokens.presence

        async def counting(into=None):
            reads.append(1)
            return await real(into)

        a.tokens.presence = counting
        await a.classify(synth("ham", 300))
        assert len(reads) == 1

        def probe(word):
            return synth("ham", 301).replace(b"Subject: ", b"Subject: " + word + b" ")

        before = await a.classify(probe(b"zzfirstword"), explain=500)
        assert "subj:zzfirstword" not in dict(before.clues)
        await a.learn([probe(b"zzfirstword")], spam=True)
        res = await a.classify(probe(b"zzfirstword"), explain=500)
        assert len(reads) == 1  # its own write: the copy has the bits
        assert "subj:zzfirstword" in dict(res.clues)
        await b.learn([probe(b"zzsecondword")], spam=True)
        res = await a.classify(probe(b"zzsecondword"), explain=500)
        assert len(reads) == 2  # another writer: read again
        assert "subj:zzsecondword" in dict(res.clues)
    finally:
        await mine.close()
        await other.close()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_a_lost_presence_filter_is_not_trusted_and_the_next_learn_rebuilds_it(
        tmp_path, redis_store, backend, caplog):
    """A presence filter that vanished (a Redis evicting keys, a hand-made delete) while the
    database says it is complete would hide every token: it is noticed, every token is looked
    up, and the next learn builds it again."""
    from filterd.bayes import presence

    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    bayes = Bayes(store)
    await train(bayes, 10)
    probe = synth("spam", 88, seed=4)
    want = (await Bayes(store).classify(probe)).probability
    await store.delete(bayes.tokens.k_presence)
    fresh = Bayes(store)
    with caplog.at_level("WARNING", logger="filterd.bayes"):
        assert (await fresh.classify(probe)).probability == want
    assert "presence filter" in caplog.text and "empty although 20 messages" in caplog.text
    assert fresh._presence is None
    await fresh.learn([synth("ham", 600, seed=4)], spam=False)
    assert fresh.tokens.presence_complete
    learned = list(await fresh.tokens.all_tokens())
    assert presence.may_hold(await fresh.tokens.presence(), learned) == learned
    if backend == "sqlite":
        await store.close()


# -- the linear model (filterd/bayes/linear.py) ------------------------------------------------
def newsletter(i: int, seed: int = 7) -> bytes:
    """A ham that reads like spam: a company newsletter full of offers, always from the same
    sender, list and site."""
    import random

    from bayes_helpers import COMMON, SPAM_WORDS

    rng = random.Random(f"{seed}-news-{i}")
    body = " ".join(rng.choice(SPAM_WORDS if rng.random() < 0.6 else COMMON) for _ in range(60))
    subj = " ".join(rng.choice(SPAM_WORDS) for _ in range(4))
    return (f"From: Work News <news@work.example>\r\nTo: bob@example.org\r\nSubject: {subj}\r\n"
            f"Message-ID: <news{i}.{seed}@work.example>\r\n"
            "Date: Fri, 27 Nov 2026 08:00:00 +0000\r\nList-Id: <news.work.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"{body}\r\nhttps://news.work.example/issue/{i}\r\n").encode()


async def bulk_train(bayes: Bayes, spam: list, ham: list) -> None:
    """As filterd bayes train does: the counts class by class, then the linear model."""
    samples: list = []
    await bayes.learn(spam, spam=True, collect=samples)
    await bayes.learn(ham, spam=False, collect=samples)
    await bayes.fit_linear(samples)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_the_linear_model_tells_a_newsletter_that_reads_like_spam_from_spam(
        tmp_path, redis_store, backend):
    """Fisher's method is unsure about a ham full of spam words (its tokens' counts say spam);
    the linear model, trained on its mistakes, learned the newsletter's own tokens, and the mix
    calls it ham while spam stays spam (Fisher's method is sure of it, and the model, which
    had little to correct there, agrees)."""
    store = SQLiteStore(tmp_path / "t.sqlite") if backend == "sqlite" else redis_store
    bayes = Bayes(store)
    await bulk_train(bayes, [synth("spam", i) for i in range(40)],
                     [synth("ham", i) for i in range(40)] + [newsletter(i) for i in range(8)])
    await bayes.tokens.state()
    assert bayes.tokens.linear_messages == 88
    for i in range(100, 105):
        news = await bayes.classify(newsletter(i, seed=9))
        assert 0.3 < news.fisher < 0.7 and news.margin < -0.5  # unsure / clearly ham
        assert news.probability < 0.2  # BAYES_HAM
        assert news.probability == linear.mix(news.fisher, news.margin)
        spam = await bayes.classify(synth("spam", i, seed=9))
        assert spam.probability > 0.99 and spam.fisher > 0.99 and spam.margin > -0.5
    plain = await Bayes(store, linear=False).classify(newsletter(104, seed=9))  # [bayes] linear
    assert plain.fisher is None and plain.probability == news.fisher  # = false: Fisher's alone


async def test_a_database_without_the_linear_model_keeps_fishers_score_until_trained(tmp_path):
    """A token database learned before the linear model existed (no weights, no lmsgs) is
    scored by Fisher's method alone; a few single learns train the model but do not switch it
    on; bulk training over the corpus does (the model then covers every message)."""
    store = SQLiteStore(tmp_path / "t.sqlite")
    try:
        spam = [synth("spam", i) for i in range(30)]
        ham = [synth("ham", i) for i in range(30)]
        await train(Bayes(store, linear=False), 30)  # as an older filterd leaves it
        probe = synth("spam", 300, seed=5)
        fresh = Bayes(store)
        res = await fresh.classify(probe)
        assert res.fisher is None and fresh.tokens.linear_messages == 0
        fisher = res.probability
        await fresh.learn([synth("spam", 301, seed=5)], spam=True)  # autolearn: one step
        await fresh.tokens.state()
        assert fresh.tokens.linear_messages == 1 and not fresh.tokens.linear_ready(31, 30)
        assert (await fresh.classify(probe)).fisher is None
        await bulk_train(fresh, spam, ham)  # "already" learned: only the model learns
        assert await fresh.tokens.totals() == (31, 30)
        res = await fresh.classify(probe)  # (at once, on the classifier that was in use)
        assert res.fisher == pytest.approx(fisher, abs=0.01) and res.margin is not None
        assert res.probability == linear.mix(res.fisher, res.margin) > 0.99
    finally:
        await store.close()


async def test_learning_steps_the_model_and_its_copy_follows_its_own_writes(tmp_path):
    """Each learn makes a step towards the message's class (its margin grows on that side);
    the classifier's copy of the weights holds its own steps (the same as the store's)
    without a read, and a relearn as the other class steps the other way."""
    store = SQLiteStore(tmp_path / "t.sqlite")
    try:
        bayes = Bayes(store)
        await train(bayes, 10)
        m = newsletter(1)
        await bayes.classify(m)  # (the copy is read)
        first = (await Bayes(store).classify(m)).margin
        await bayes.learn([m], spam=False)
        assert bayes._weights == await bayes.tokens.linear_weights()
        after = (await Bayes(store).classify(m)).margin
        assert after < first
        await bayes.learn([m], spam=True)  # relearned as spam
        assert bayes._weights == await bayes.tokens.linear_weights()
        assert (await Bayes(store).classify(m)).margin > after
        # a spam Fisher's method is already sure of (before it is learned) needs no step
        weights = await bayes.tokens.linear_weights()
        sure = synth("spam", 200, seed=4)
        assert (await Bayes(store).classify(sure)).fisher > 0.9999
        await bayes.learn([sure], spam=True)
        assert await bayes.tokens.linear_weights() == weights
        assert await bayes.tokens.totals() == (12, 10)  # (counted all the same)
    finally:
        await store.close()


def test_a_passive_aggressive_step_reaches_the_margin_and_no_further():
    """PA-I: a message short of margin 1 on its side (Fisher's say, the offset, counted) is
    moved exactly to it (within the weights' rounding) when C allows, by at most C otherwise;
    a message past the margin, or without tokens, is left alone; the bias is not learned;
    bulk training is reproducible."""
    w = linear.zeros()
    t = linear.Trainer(w, 0)
    bk = array("I", linear.buckets([f"tok{i}" for i in range(100)]))

    def z():
        return linear.margin(sum(w[b] for b in bk), t.bias, len(bk))

    t.learn(bk, True)
    assert z() == pytest.approx(1.0, abs=1e-4)
    t.learn(bk, True)  # already at the margin: no step
    assert z() == pytest.approx(1.0, abs=1e-4) and t.messages == 2
    t.learn(bk, False)  # a loss of 2: C = 1 takes it half way
    assert z() == pytest.approx(0.0, abs=1e-4)
    t.learn(bk, False, linear.offset(0.5))  # (Fisher unsure: no say)
    assert z() == pytest.approx(-1.0, abs=1e-4)
    t.learn(bk, True, linear.offset(1.0))  # Fisher sure (1): the model is taken to 1 - 1
    assert z() == pytest.approx(0.0, abs=1e-4)
    t.learn(bk, True, linear.offset(1.0))  # at the margin with Fisher's say: no step
    assert z() == pytest.approx(0.0, abs=1e-4) and t.messages == 6
    t.learn(bk, True, 0.75)  # to 1 - 0.75
    assert z() == pytest.approx(0.25, abs=1e-4)
    assert linear.offset(1.0) == linear.STEP_LIMIT and linear.offset(0.0) == -linear.STEP_LIMIT
    assert linear.offset(1.0, linear.MIX_LIMIT) == linear.MIX_LIMIT
    assert linear.offset(0.99) == pytest.approx(0.1 * math.log(99))
    assert linear.step(-5.0, True, 100, c=0.5) == (round(0.5 / 10 / linear.UNIT), 0)
    assert linear.step(2.0, True, 100) == (0, 0) and linear.step(0.0, True, 0) == (0, 0)
    assert t.deltas == {b: w[b] for b in set(bk)} and t.bias_delta == t.bias == 0
    samples = [(array("I", linear.buckets([f"s{i}", "x"])), True) for i in range(20)] + [
        (array("I", linear.buckets([f"h{i}", "x"])), False) for i in range(20)]
    a, b = linear.Trainer(linear.zeros(), 0), linear.Trainer(linear.zeros(), 0)
    a.fit(samples)
    b.fit(samples)
    assert a.weights == b.weights and a.bias == b.bias and a.messages == 40
    with pytest.raises(ValueError):
        a.fit(samples, offsets=[0.0])  # (an offset for each sample, or none)
    assert linear.mix(0.5, 0.0) == 0.5 and linear.mix(1.0, 50.0) == 1.0
    assert linear.mix(0.0, -400.0) == 0.0
    # Fisher's method alone, sure: within the top band, not past it
    assert 0.99 < linear.mix(1.0, 0.0) < 0.996 and 0.004 < linear.mix(0.0, 0.0) < 0.01


def test_bulk_training_counts_fishers_say_from_the_other_folds():
    """Bulk training's offsets: each message's is Fisher's probability for it from the
    counts of the other folds (classify(), bit for bit), within ±STEP_LIMIT; a message whose
    tokens are its own alone, or a corpus of one class, gets 0 (Fisher's method has no say).
    Fisher's method gets this easy corpus right out of fold, but for the newsletters."""
    import random
    from collections import Counter

    from filterd.bayes.tokenizer import tokenize

    msgs = ([(synth("spam", i), True) for i in range(12)]
            + [(synth("ham", i), False) for i in range(12)]
            + [(newsletter(i), False) for i in range(3)])
    samples = [(linear.hashes(tokenize(m)), spam) for m, spam in msgs]
    params = Params()
    got = linear.fold_offsets(samples, params)
    order = list(range(len(samples)))
    random.Random(linear.SEED).shuffle(order)
    for k in range(linear.FOLDS):  # the same by hand, fold by fold
        fold = set(order[k::linear.FOLDS])
        sc, hc = Counter(), Counter()
        for i, (bk, spam) in enumerate(samples):
            if i not in fold:
                (sc if spam else hc).update(bk)
        nspam = sum(1 for i, (_, spam) in enumerate(samples) if i not in fold and spam)
        nham = len(samples) - len(fold) - nspam
        for i in fold:
            counts = {t: (sc[t], hc[t]) for t in samples[i][0] if sc[t] or hc[t]}
            assert got[i] == linear.offset(classify(counts, nspam, nham, params).probability)
    from filterd.bayes import engine

    with pytest.MonkeyPatch.context() as mp:  # the classify path's passes in Python: the same
        mp.setattr(engine, "_cached_logs", engine._cached_logs_py)
        mp.setattr(engine, "_token_logs", engine._token_logs_py)
        mp.setattr(engine, "_fisher", engine._fisher_py)
        assert linear.fold_offsets(samples, params) == got
    assert all(o == linear.STEP_LIMIT for o in got[:12])  # spam: sure, and right
    assert all(o == -linear.STEP_LIMIT for o in got[12:24])  # ham: the same
    assert all(o > -0.5 for o in got[24:])  # newsletters: unsure, or wrong
    lone = [(linear.hashes({f"only-{i}"}), i % 2 == 0) for i in range(10)]
    assert linear.fold_offsets(lone, params) == [0.0] * 10
    assert linear.fold_offsets(samples[:12], params) == [0.0] * 12  # spam alone
    assert linear.fold_offsets([], params) == []
