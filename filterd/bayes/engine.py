"""The Bayesian filter as one object: tokenize, look up, combine; learn and unlearn.

:func:`learn_message` is THE learn path: training by e-mail, autolearn, ``filterd bayes learn``
and (later) quarantine release all call it, so every way of teaching the filter counts a message
once and moves it when it is relearned as the other class.
"""
from __future__ import annotations

import functools
import logging
import math
import struct
import time
from array import array
from dataclasses import dataclass
from typing import Iterable

from ..model import Message
from . import linear, presence
from .classifier import Params, Result, combine, combine_logs, probabilities
from .store import HAM, MASK, SHIFT, SPAM, TokenStore, digest
from .tokenizer import _c as _speedups
from .tokenizer import tokenize

log = logging.getLogger("filterd.bayes")

ONE = {SPAM: 1 << SHIFT, HAM: 1}
CACHE_MAX = 500_000  # token probabilities kept in memory (some 50 MB at most)
# The cached probabilities outlive small changes to the database: one more learned message
# (autolearn learns most clean mail) moves a token's f(w) by a fraction of a percent, and
# emptying the cache for it would make every message look all its tokens up again. The cache is
# emptied when the spam or ham count has moved by more than CACHE_DRIFT of what it was when the
# cache was started, when it is older than CACHE_AGE seconds, or when it outgrows CACHE_MAX.
CACHE_DRIFT = 0.01
CACHE_AGE = 300.0


# A token's cache entry when it has evidence: f(w), ln f, ln(1 - f) and its linear weight in one
# bytes object (one object to reach per token in the pass over a message's tokens, where a
# tuple of four numbers was five). Learned tokens without evidence are cached as their weight
# (an int), never-learned ones as None.
ENTRY = struct.Struct("=dddq")
_PAIR = struct.Struct("=dd")  # (ln f, ln(1 - f)): the logarithms passed on to Fisher's test


def entry_f(entry) -> float | None:
    """f(w) of a cache entry (None: no evidence)."""
    return ENTRY.unpack(entry)[0] if entry.__class__ is bytes else None


def _cached_logs_py(cache: dict, tokens: Iterable) -> tuple[list, bytes, int]:
    """The classifier's pass over a message's tokens (a set; bulk training passes arrays of
    hashes): (the tokens not in ``cache``, the
    ``(ln f, ln(1 - f))`` pairs of the cached tokens with evidence as packed doubles, the sum of
    the cached tokens' linear weights). ``cache`` maps a token to an :data:`ENTRY`, to its
    weight alone (learned, but no evidence) or to None (never learned). The C extension's
    ``cached_logs`` does the same in one pass over the tokens (tests/test_bayes_speedups.py)."""
    missing = (list(tokens.difference(cache)) if isinstance(tokens, (set, frozenset))
               else [t for t in tokens if t not in cache])
    found = [v for v in map(cache.get, tokens) if v is not None]
    entries = [ENTRY.unpack(v) for v in found if v.__class__ is bytes]
    weights = sum(v for v in found if v.__class__ is int) + sum(e[3] for e in entries)
    logs = b"".join(_PAIR.pack(e[1], e[2]) for e in entries)
    return missing, logs, weights


def _token_logs_py(cache: dict, missing: list, packed: dict, nspam: int, nham: int,
                   robs: float, robx: float, min_dev: float, min_count: int,
                   weights) -> tuple[bytes, int]:
    """The rest of the pass, for the ``missing`` tokens once looked up (``packed``: the learned
    ones' counts): each goes into ``cache``, as None (never learned), as its linear weight
    (from ``weights``, 0 without them: no evidence) or as an :data:`ENTRY` (f(w) from
    :func:`~.classifier.probabilities`, its logarithms, its weight). Returns the ``(ln f,
    ln(1 - f))`` pairs of those with evidence, packed, and the sum of the learned tokens'
    weights. The C extension's ``token_logs`` does the same without a Python loop per token
    (the same bits: tests/test_bayes_speedups.py)."""
    cache.update(dict.fromkeys(missing))
    if not packed:
        return b"", 0
    found = list(packed)
    ws = (list(map(weights.__getitem__, linear.buckets(found))) if weights is not None
          else [0] * len(found))
    cache.update(zip(found, ws))  # (the weight alone, replaced below where there is evidence)
    params = Params(robs=robs, robx=robx, min_dev=min_dev, min_count=min_count)
    probs = probabilities(((t, v >> SHIFT, v & MASK) for t, v in packed.items()),
                          nspam, nham, params)
    logs = []
    for t, (f, log_f, log_1f) in probs.items():
        cache[t] = ENTRY.pack(f, log_f, log_1f, cache[t])
        logs.append(_PAIR.pack(log_f, log_1f))
    return b"".join(logs), sum(ws)


def _fisher_py(parts: list, n_eff: int) -> tuple[float, float, float, int]:
    """Fisher's combination of the ``(ln f, ln(1 - f))`` pairs the pass collected (``parts``:
    bytes of packed doubles each), as (probability, spam evidence, ham evidence, tokens used):
    the sums are exact (the result does not depend on the order the tokens came in). The C
    extension's ``fisher`` gives the same bits (tests/test_bayes_speedups.py)."""
    values = array("d")
    for part in parts:
        values.frombytes(part)
    r = combine_logs(math.fsum(values[0::2]), math.fsum(values[1::2]), len(values) // 2, n_eff)
    return r.probability, r.spam_evidence, r.ham_evidence, r.tokens_used


# the C passes when the extension is built (and not turned off: FILTERD_PURE_PYTHON=1); an
# extension built before the cache entries were packed has other signatures: not used
_NEW_C = getattr(_speedups, "ENTRY_SIZE", None) == ENTRY.size
_cached_logs = _speedups.cached_logs if _NEW_C else _cached_logs_py
_token_logs = _speedups.token_logs if _NEW_C else _token_logs_py
_fisher = functools.partial(_speedups.fisher, math.lgamma) if _NEW_C else _fisher_py


@dataclass
class LearnStats:
    learned: int = 0  # newly learned
    relearned: int = 0  # moved from the other class
    already: int = 0  # already learned as this class: nothing to do
    failed: int = 0

    def __iadd__(self, other: "LearnStats") -> "LearnStats":
        self.learned += other.learned
        self.relearned += other.relearned
        self.already += other.already
        self.failed += other.failed
        return self

    @property
    def outcome(self) -> str:
        """One word for a single message: learned, relearned, already or failed."""
        for name in ("relearned", "learned", "already", "failed"):
            if getattr(self, name):
                return name
        return "none"


class Bayes:
    def __init__(self, store, namespace: str = "bayes:", params: Params | None = None,
                 cache_drift: float = CACHE_DRIFT, cache_age: float = CACHE_AGE,
                 linear: bool = True):
        self.tokens = TokenStore(store, namespace)
        self.params = params or Params()
        # the linear model (filterd/bayes/linear.py): trained by every learn and mixed into
        # the probability once trained on enough messages; False: Fisher's score alone
        self.linear = linear
        # a copy of its weights and the database generation it holds every change of (read
        # with the token cache, kept up to date with this object's own learning)
        self._weights = None
        self._weights_gen = -1
        # token -> an ENTRY (f(w), ln f, ln(1 - f), linear weight), the weight alone (learned,
        # too weak to count for Fisher) or None (never learned); valid while the store's counts
        # stay within cache_drift of _fstate's (see CACHE_DRIFT)
        self._fcache: dict[str, bytes | int | None] = {}
        self._fstate: tuple | None = None
        self._fborn = 0.0  # when the cache was started (monotonic)
        # A copy of the presence filter (None: not complete yet), its epoch, and the database
        # generation it holds every bit of: read when the cache is started, unless the only
        # writes since were this object's own, whose bits it adds to the copy
        self._presence: bytearray | None = None
        self._presence_epoch = 0
        self._presence_gen = -1
        self.cache_drift = cache_drift
        self.cache_age = cache_age
        self._warned_at = 0.0  # when the outdated-database warning was last logged

    @classmethod
    def from_options(cls, store, options: dict) -> "Bayes":
        d = Params()
        p = Params(robs=float(options.get("robs", d.robs)), robx=float(options.get("robx", d.robx)),
                   min_dev=float(options.get("min_dev", d.min_dev)),
                   max_tokens=int(options.get("max_tokens", d.max_tokens)),
                   n_eff=int(options.get("n_eff", d.n_eff)))
        return cls(store, options.get("namespace", "bayes:"), p,
                   cache_drift=float(options.get("cache_drift", CACHE_DRIFT)),
                   cache_age=float(options.get("cache_age", CACHE_AGE)),
                   linear=bool(options.get("linear", True)))

    async def classify(self, message: Message | bytes, explain: int = 0,
                       state: tuple[int, int, int] | None = None) -> Result:
        """Spam probability of a message. ``state`` is :meth:`TokenStore.state` when the
        caller has just read it (saves a read); token probabilities are cached while it holds,
        so a message costs one store query for the tokens not seen since (one ``HMGET`` on
        Redis, one ``IN`` query on SQLite)."""
        return await self._score(tokenize(message), explain, state)

    async def _score(self, toks: set[str], explain: int = 0,
                     state: tuple[int, int, int] | None = None) -> Result:
        """:meth:`classify` for a message's tokens."""
        state = state or await self.tokens.state()
        nspam, nham = state[0], state[1]
        if nspam <= 0 or nham <= 0:
            return Result(0.5, 0.0, 0.0, 0)
        fc = self._fcache
        if state != self._fstate and not self._cache_holds(state) or len(fc) > CACHE_MAX:
            fc.clear()
            self._fstate = state
            self._fborn = time.monotonic()
            self._check_format(nspam, nham)
            if not self._presence_holds(state):
                # (read with the cache: a token learned since elsewhere is missed as the cache
                # misses it)
                self._presence = await self.tokens.presence(self._presence)
                self._presence_epoch = self.tokens.presence_epoch
                self._presence_gen = state[2]
            if self.linear and (self._weights is None or self._weights_gen != state[2]):
                self._weights = await self.tokens.linear_weights()
                self._weights_gen = state[2]
        # one pass: the tokens to look up, the logarithms of the cached ones with evidence and
        # the sum of their linear weights
        missing, logs, wsum = _cached_logs(fc, toks)
        parts = [logs]
        p = self.params
        if missing:
            # looked up: the tokens the presence filter says may have been learned (about
            # half of them); their entries (f(w), both logarithms Fisher's method sums, the
            # linear weight), weights alone (no evidence) or None (not found) go into the
            # cache (the others, mostly a message's own words, would only swell it: the
            # filter answers for them again)
            look = missing if self._presence is None else presence.may_hold(self._presence,
                                                                             missing)
            if look:
                more, w = _token_logs(fc, look, await self.tokens.packed(look), nspam, nham,
                                      p.robs, p.robx, p.min_dev, p.min_count, self._weights)
                parts.append(more)
                wsum += w
        max_tokens = p.max_tokens
        if explain or (max_tokens and sum(map(len, parts)) > max_tokens * _PAIR.size):
            clues = sorted(((entry_f(fc[t]), t) for t in toks if fc.get(t).__class__ is bytes),
                           key=lambda x: (-abs(x[0] - 0.5), x[1]))
            res = combine([f for f, _ in clues], max_tokens, p.n_eff)
            res.clues = [(t, f) for f, t in clues[:explain]]
        else:
            res = Result(*_fisher(parts, p.n_eff))
        if self.linear and self._weights is not None and self.tokens.linear_ready(nspam, nham):
            # (the weights of the learned tokens: a token never learned has none, whatever
            # shares its bucket)
            z = linear.margin(wsum, self.tokens.linear_bias, len(toks))
            res.fisher, res.margin = res.probability, z
            res.probability = linear.mix(res.probability, z)
        return res

    def _cache_holds(self, state: tuple) -> bool:
        """Whether the cached probabilities still serve the database as ``state`` finds it:
        its spam and ham counts are each within ``cache_drift`` of those the cache was
        started with, and the cache is younger than ``cache_age`` (see :data:`CACHE_DRIFT`)."""
        if (self.cache_drift <= 0 or self._fstate is None
                or time.monotonic() - self._fborn > self.cache_age):
            return False  # (drift 0: any change, even one that leaves the counts, empties it)
        s0, h0 = self._fstate[0], self._fstate[1]
        drift = self.cache_drift
        return abs(state[0] - s0) <= drift * s0 and abs(state[1] - h0) <= drift * h0

    def _presence_holds(self, state: tuple) -> bool:
        """Whether the copy of the presence filter still has every bit: the database has the
        epoch it was read under, and no writer but this object has written since."""
        return (self._presence is not None and self._presence_epoch == self.tokens.presence_epoch
                and self._presence_gen == state[2])

    def _check_format(self, nspam: int, nham: int) -> None:
        """Log (at most hourly) when the database holds messages learned with an older token
        format: it should be retrained."""
        old = self.tokens.outdated(nspam, nham)
        now = time.monotonic()
        if old and (not self._warned_at or now - self._warned_at > 3600):
            self._warned_at = now
            log.warning("bayes: %s", self.tokens.outdated_note(old, nspam + nham))

    async def learn(self, messages: Iterable[Message | bytes], spam: bool,
                    batch: int = 500, progress=None, collect: list | None = None) -> LearnStats:
        """Learn many messages as one class, in batches of ``batch`` (one store round trip per
        batch). ``progress(n)`` is called after each message. The linear model makes a step
        for each message, counting Fisher's probability for it before it is learned; with
        ``collect`` (bulk training) the message's ``(hashes, spam)`` (:func:`.linear.hashes`)
        is appended to it instead, for :meth:`fit_linear` once every class is counted."""
        stats = LearnStats()
        pending: list[tuple[str, set[str]]] = []
        for m in messages:
            try:
                raw = m.raw if isinstance(m, Message) else bytes(m)
                pending.append((digest(raw), tokenize(m)))
            except Exception as exc:  # noqa: BLE001 - one bad message must not stop training
                log.warning("bayes: cannot tokenize a message, skipped: %s", exc)
                stats.failed += 1
            if progress:
                progress(1)
            if len(pending) >= batch:
                stats += await self._flush(pending, spam, collect)
                pending = []
        if pending:
            stats += await self._flush(pending, spam, collect)
        return stats

    async def fit_linear(self, samples: list[tuple[array, bool]],
                         passes: int = linear.PASSES) -> linear.Trainer:
        """Bulk training of the linear model: ``passes`` passes over the ``(hashes, spam)``
        samples :meth:`learn` collected, ham and spam shuffled together, from the weights in
        the store, each step counting Fisher's probability for its message from the other
        folds' counts (:func:`.linear.fold_offsets`); the changes are written at the end, in
        one batch."""
        await self.tokens.state()
        trainer = linear.Trainer(await self.tokens.linear_weights(), self.tokens.linear_bias)
        trainer.fit(samples, passes, offsets=linear.fold_offsets(samples, self.params))
        # (every weight may have moved: the cache, whose entries hold them, starts afresh and
        # reads them again)
        self._weights, self._fstate = None, None
        await self.tokens.apply({}, 0, 0, {}, trainer=trainer)
        return trainer

    async def _flush(self, pending: list[tuple[str, set[str]]], spam: bool,
                     collect: list | None = None) -> LearnStats:
        cls = SPAM if spam else HAM
        other = HAM if spam else SPAM
        stats = LearnStats()
        state = await self.tokens.state()
        gen = state[2]
        if not self.tokens.presence_complete:
            n = await self.tokens.build_presence()
            if n:
                log.info("bayes: presence filter built from the %d tokens learned before it "
                         "existed (%s; once per database)", n, self.tokens.ns)
        # the filter this classifier read: its tokens need no write (not after a clear)
        known = self._presence if self._presence_epoch == self.tokens.presence_epoch else None
        seen = await self.tokens.seen([d for d, _ in pending])
        trainer = None
        offsets: list[float] = []
        if self.linear and collect is None:
            # each step counts Fisher's say on the message before it is learned (read first:
            # a score may read the weights again)
            for _, toks in pending:
                r = await self._score(toks, state=state)
                offsets.append(linear.offset(r.probability if r.fisher is None else r.fisher))
            # (this object's copy of the weights when it has one: its own steps are in it,
            # other writers' since its last read are not, which only changes a step's size)
            if self._weights is None:
                self._weights, self._weights_gen = await self.tokens.linear_weights(), gen
            trainer = linear.Trainer(self._weights, self.tokens.linear_bias)
        deltas: dict[str, int] = {}
        seen_d: dict[str, int] = {}
        nspam = nham = 0
        for i, (dig, toks) in enumerate(pending):
            if self.linear:  # (every message, also one learned before: a step if it needs it)
                bkts = linear.hashes(toks)  # (kept by bulk training: 4 bytes a token)
                if trainer is not None:
                    trainer.learn(bkts, spam, offsets[i])
                else:
                    collect.append((bkts, spam))
            prev = seen.get(dig, 0)
            if prev == cls:
                stats.already += 1
                continue
            add = ONE[cls]
            if prev == other:  # move it: unlearn as the other class first
                add -= ONE[other]
                stats.relearned += 1
                if spam:
                    nham -= 1
                else:
                    nspam -= 1
            else:
                stats.learned += 1
            for t in toks:
                deltas[t] = deltas.get(t, 0) + add
            if spam:
                nspam += 1
            else:
                nham += 1
            seen_d[dig] = cls - prev
            seen[dig] = cls  # a duplicate later in the same batch is "already"
        try:
            wrote = await self.tokens.apply(deltas, nspam, nham, seen_d, learned=stats.learned,
                                            known=known, trainer=trainer)
        except BaseException:
            # (the copy has steps the store may not: read it again, with a fresh cache)
            self._weights, self._fstate = None, None
            raise
        if wrote:
            if known is not None and self._presence_gen == gen:
                self._presence_gen = gen + 1  # (the copy has this write's bits too)
            if trainer is not None and self._weights_gen == gen:
                self._weights_gen = gen + 1  # (and the weights this write's steps)
        return stats

    async def forget(self, message: Message | bytes) -> bool:
        """Unlearn a message learned before; False when it was never learned."""
        raw = message.raw if isinstance(message, Message) else bytes(message)
        dig = digest(raw)
        prev = (await self.tokens.seen([dig])).get(dig, 0)
        if prev not in (SPAM, HAM):
            return False
        sub = -ONE[prev]
        await self.tokens.apply({t: sub for t in tokenize(message)},
                                -1 if prev == SPAM else 0, -1 if prev == HAM else 0,
                                {dig: -prev}, learned=-1)
        return True


async def learn_message(services_or_store, raw: bytes | Message, spam: bool,
                        options: dict | None = None, bayes: Bayes | None = None) -> str:
    """THE learn path: learn one message as spam (``spam=True``) or ham.

    ``services_or_store`` is a :class:`filterd.services.Services` (the token store and the
    ``[bayes]`` options come from it) or a :class:`filterd.store.Store`. Returns ``"learned"``,
    ``"relearned"`` (it was learned as the other class and was moved) or ``"already"``.
    Quarantine release calls this with ``spam=False`` for released mail. ``bayes``: the
    classifier of the caller (the Bayes plugin's) on the same store, whose copy of the presence
    filter spares writing the bits of tokens learned before.
    """
    store = services_or_store
    if hasattr(services_or_store, "config") and hasattr(services_or_store, "store"):
        store = services_or_store.store
        if options is None:
            sect = services_or_store.config.section("bayes")
            options = sect if isinstance(sect, dict) else {}
    if bayes is None or bayes.tokens.store is not store:
        bayes = Bayes.from_options(store, options or {})
    stats = await bayes.learn([raw], spam)
    outcome = stats.outcome
    log.info("bayes: message learned as %s (%s)", "spam" if spam else "ham", outcome)
    return outcome
