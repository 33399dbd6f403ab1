"""The linear model: a weight per token bucket, learned discriminatively, mixed with Fisher's score.

Fisher's method (:mod:`.classifier`) scores a message from its tokens' counts. The messages it
gets wrong with confidence are hams whose tokens' counts say spam: commercial newsletters, a
mailing in a charset mostly seen in spam. A linear model trained on the same tokens learns
weights that correct for that, because it learns from mistakes rather than from counts; mixed
with Fisher's score it raised spam recall at 0.1 % false positives on the SpamAssassin corpus
from 90.0 to 94.4 % in 5-fold cross-validation (94.2-94.8 % with other seeds), from 78.0 to
97.3 % on a random split and from 96.7 to 98.0 % on the date split (``bench/bayes_bench.py``;
the experiments before it: ``bench/bayes_linear.py``; figures in bench/README.md).

- **Weights.** :data:`BUCKETS` 32-bit integers (1 MiB) in the store as one counter array,
  ``<ns>linear<LAYOUT>`` (:meth:`filterd.store.Store.counters_get`); a weight is its integer
  times :data:`UNIT`. A token's bucket is a 64-bit hash of its UTF-8 bytes, low 18 bits
  (:func:`_bucket_py`; the hashing trick: tokens that share a bucket share a weight; measured:
  no loss against a weight per token). The bias, the meta field ``lbias`` (times
  :data:`UNIT`), is no longer learned (:func:`step`): a model trained before keeps its own.
- **Margin** of a message of n tokens: ``z = UNIT * (bias + sum of its tokens' weights / √n)``,
  where a token never learned weighs nothing (whatever else shares its bucket).
- **Fisher's say** in units of the margin: ``offset = logit(f) / 10`` for Fisher's
  probability f, within ±:data:`STEP_LIMIT` when learning and ±:data:`MIX_LIMIT` when mixing
  (:func:`offset`).
- **Learning** (passive-aggressive, PA-I: Crammer et al., "Online Passive-Aggressive
  Algorithms", JMLR 2006) on the margin *plus Fisher's say*: for a label y (+1 spam, -1 ham)
  the loss is ``1 - y (offset + z)``; when it is above 0 the step is ``τ = min(C, loss)``
  and each token's bucket gains ``round(τ y / √n / UNIT)``. So the model learns what Fisher's
  method gets wrong, and leaves alone what it gets right (stacking: Wolpert, "Stacked
  generalization", 1992). The offset must be Fisher's probability for a message it has not
  learned: a single learn (autolearn, training by e-mail, quarantine release) takes it from
  the counts before the message is counted; bulk training (``filterd bayes train``) deals the
  messages into :data:`FOLDS` folds and takes each message's from the other folds' counts
  (:func:`fold_offsets`), then makes :data:`PASSES` passes over all of them, ham and spam
  shuffled together (seeded: the same files give the same model). All in integers, so SQLite
  and Redis hold the same weights and give the same scores. Forgetting a message leaves the
  weights (a step is not undone); relearning it as the other class steps towards that class.
- **Mixing:** ``p = σ(3.5 (offset + z))``, the offset within ±1.5: Fisher's method alone, sure,
  says 0.995 (BAYES_SPAM_HIGH) or 0.005; the scale puts the usual bands where they were: on
  the benchmark's splits, as few hams at or above 0.9 and more spam there than with Fisher's
  score alone, and more than 90 % of ham at or below 0.01 (bench/README.md).
- **When it counts.** The mix is used once the model has been trained on at least half as many
  messages as the token counts hold (meta field ``lmsgs``): a database trained before the model
  existed keeps Fisher's score alone until ``filterd bayes train`` runs again over the corpus
  (or autolearn has caught up); ``filterd bayes stats`` says which.

Classifying adds up the weights of a message's learned tokens in the classifier's pass over
its tokens (:mod:`.engine`: a token's weight is cached with its probability, so a cached token
costs no hash). The C extension's ``linear_buckets`` and ``linear_step`` do what
:func:`_buckets_py` and :func:`_step_py` do (tests/test_bayes_speedups.py).
"""
from __future__ import annotations

import math
import random
from array import array
from itertools import repeat
from typing import Iterable

from ..store import add_counters
from .tokenizer import _c

BUCKETS = 1 << 18
MASK = BUCKETS - 1
HASH_MASK = 0xFFFFFFFF  # a token's 32-bit hash (bulk training): its bucket is its low bits
UNIT = 1e-6  # a weight's resolution: stored as integers
LAYOUT = 1  # the key is "<ns>linear<LAYOUT>"; another layout (size, hash) starts afresh
C = 1.0  # PA-I's largest step
PASSES = 5  # passes of bulk training (one pass measured clearly worse)
SEED = 1  # the order of bulk training's passes
# The mix: σ(LINEAR_SCALE * (offset + z)), offset = logit(f) * OFFSET_SCALE within ±MIX_LIMIT:
# Fisher's say in units of the margin, which a step counts too, within ±STEP_LIMIT
LINEAR_SCALE = 3.5
OFFSET_SCALE = 0.1
STEP_LIMIT = 1.0
MIX_LIMIT = 1.5
FOLDS = 5  # bulk training's Fisher probabilities: each message's from the other 4/5 (fold_offsets)
_M64 = (1 << 64) - 1


def _bucket_py(token: str, mask: int = MASK) -> int:
    """A token's bucket (with ``mask`` :data:`HASH_MASK`, its 32-bit hash): its UTF-8 bytes
    as little-endian 64-bit words (the last one zero-padded), each mixed in with a multiply,
    then MurmurHash3's final mix (fmix64); a word at a time, where a CRC goes a byte at a
    time (tokens are short: the hash is most of the model's cost per message)."""
    b = token.encode("utf-8", "surrogatepass")
    h = 0x9E3779B97F4A7C15 ^ len(b)
    for i in range(0, len(b), 8):
        h = ((h ^ int.from_bytes(b[i:i + 8], "little")) * 0xFF51AFD7ED558CCD) & _M64
        h ^= h >> 32
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    h ^= h >> 33
    return h & mask


def _buckets_py(tokens: Iterable[str], mask: int = MASK) -> list[int]:
    return [_bucket_py(t, mask) for t in tokens]


buckets = getattr(_c, "linear_buckets", None) or _buckets_py


def hashes(tokens: Iterable[str]) -> array:
    """The tokens' 32-bit hashes, an ``array('I')`` (4 bytes a token): what bulk training keeps
    of each message. A hash's low bits are the token's bucket (:func:`_step_py` and the C
    ``linear_step`` take either), and its 32 bits tell the message's tokens apart for
    :func:`fold_offsets`."""
    return array("I", buckets(tokens, HASH_MASK))


def zeros() -> array:
    return array("i", bytes(4 * BUCKETS))


def margin(total: int, bias: int, n: int) -> float:
    """z for a message of ``n`` tokens whose buckets' weights sum to ``total``."""
    return UNIT * (bias + total / math.sqrt(n)) if n else UNIT * bias


def step(z: float, spam: bool, n: int, c: float = C) -> tuple[int, int]:
    """PA-I's change for one message: (added to each token's bucket, added to the bias). The
    bias is not learned (0): Fisher's method holds the classes' prior, and a bias learned from
    a database's first, lopsided learns would stay once Fisher's say takes later messages to
    the margin (a model trained before keeps the bias it has)."""
    y = 1.0 if spam else -1.0
    loss = 1.0 - y * z
    if loss <= 0.0 or n <= 0:
        return 0, 0
    tau = min(c, loss)  # |x|² = 1 (the tokens, scaled by 1/√n)
    return round(tau * y / math.sqrt(n) / UNIT), 0


def offset(fisher: float, limit: float = STEP_LIMIT) -> float:
    """Fisher's say in units of the margin: ``logit(fisher) * OFFSET_SCALE`` within
    ±``limit``. A step for a message counts it (within ±STEP_LIMIT: Fisher's method alone can
    take a message to the margin, where no step is needed, but not past it), so the model
    learns what Fisher's method gets wrong rather than what it gets right; the mix counts it
    within ±MIX_LIMIT (Fisher's method alone can call a message certain: σ(3.5 × 1.5) =
    0.995)."""
    f = min(max(fisher, 1e-15), 1.0 - 1e-15)
    return min(max(OFFSET_SCALE * math.log(f / (1.0 - f)), -limit), limit)


def mix(fisher: float, z: float) -> float:
    """The reported probability: Fisher's ``fisher`` and the margin ``z`` mixed,
    ``σ(LINEAR_SCALE * (offset(fisher, MIX_LIMIT) + z))``."""
    s = LINEAR_SCALE * (offset(fisher, MIX_LIMIT) + z)
    if s < -700.0:
        return 0.0
    return 1.0 / (1.0 + math.exp(-s))


def _step_py(weights: array, bkts: array, bias: int, spam: bool, c: float,
             offset: float = 0.0) -> tuple[int, int]:
    """One step for a message whose tokens' buckets (or hashes: a bucket is a hash's low
    bits) are ``bkts`` (an ``array('I')``): its margin plus ``offset`` (Fisher's say,
    :func:`offset`), PA-I's change (:func:`step`), the bucket change added to ``weights`` in
    place (saturating at the 32-bit limits); returns (bucket change, bias change). The C
    extension's ``linear_step`` does the same (the same weights: tests/test_bayes_speedups.py)."""
    n = len(bkts)
    idx = [b & MASK for b in bkts]
    dw, db = step(offset + margin(sum(map(weights.__getitem__, idx)), bias, n), spam, n, c)
    if dw:
        add_counters(weights, idx, repeat(dw))
    return dw, db


_step = getattr(_c, "linear_step", None) or _step_py


class Trainer:
    """Steps of the model on a copy of its weights, collecting what to write: ``deltas``
    (bucket -> change) and ``bias_delta``. ``weights`` is changed in place."""

    def __init__(self, weights: array, bias: int):
        self.weights = weights
        self.bias = bias
        self.bias_delta = 0
        self.deltas: dict[int, int] = {}
        self.messages = 0

    def learn(self, bkts: array, spam: bool, offset: float = 0.0) -> None:
        """One step for a message (``bkts``: its tokens' buckets or hashes, an ``array('I')``;
        ``offset``: :func:`offset` of Fisher's probability for it before it was learned)."""
        dw, db = _step(self.weights, bkts, self.bias, spam, C, offset)
        self.messages += 1
        if dw:
            deltas = self.deltas
            for b in bkts:
                b &= MASK
                deltas[b] = deltas.get(b, 0) + dw
        self.bias += db
        self.bias_delta += db

    def fit(self, samples: list[tuple[array, bool]], passes: int = PASSES,
            seed: int = SEED, offsets: list[float] | None = None) -> None:
        """``passes`` passes over ``(buckets or hashes, spam)`` samples, shuffled before each,
        each sample's step counting its ``offsets`` entry (:func:`fold_offsets`; None: 0); the
        changes to write are the weights' differences at the end."""
        if offsets is not None and len(offsets) != len(samples):
            raise ValueError(f"{len(offsets)} offsets for {len(samples)} samples")
        w = self.weights
        before = array("i", w)
        order = [(b, spam, o) for (b, spam), o in zip(samples, offsets or repeat(0.0))]
        rng = random.Random(seed)
        step_, bias, bias_delta = _step, self.bias, 0
        for _ in range(passes):
            rng.shuffle(order)
            for bkts, spam, off in order:
                dw, db = step_(w, bkts, bias, spam, C, off)
                bias += db
                bias_delta += db
        self.bias, self.bias_delta = bias, self.bias_delta + bias_delta
        deltas = self.deltas
        for i in (i for i, (a, b) in enumerate(zip(w, before)) if a != b):
            deltas[i] = deltas.get(i, 0) + w[i] - before[i]
        self.messages = len(samples)  # (messages trained on, not steps)


def fold_offsets(samples: list[tuple[array, bool]], params, folds: int = FOLDS,
                 seed: int = SEED) -> list[float]:
    """For bulk training: each sample's :func:`offset`, from Fisher's probability for it as a
    classifier that never saw it gives it (stacking, Wolpert 1992). The samples
    (``(hashes, spam)``, :func:`hashes`) are dealt into ``folds`` folds in a seeded order; a
    message's probability comes from the token counts of the other folds, so the model learns
    to correct what Fisher's method gets wrong on unseen mail, not on mail it has learned
    (there it is nearly always right, and sure). ``params``: the classifier's
    :class:`~.classifier.Params`. The counts are of these samples alone, by 32-bit hash (two
    tokens whose hashes collide share counts here, nowhere else). The probabilities are the
    classify path's (:mod:`.engine`'s passes, in C where built): :func:`~.classifier.classify`'s,
    bit for bit (tests/test_bayes_store.py), each token's f(w) computed once per fold."""
    from collections import Counter
    from operator import lshift, or_, sub

    from .engine import SHIFT, _cached_logs, _fisher, _token_logs

    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    counts, messages = [Counter(), Counter()], [0, 0]  # [ham, spam], over all samples
    for bkts, spam in samples:
        counts[spam].update(bkts)
        messages[spam] += 1
    hg, sg = counts[0].get, counts[1].get
    out = [0.0] * len(samples)
    p = params
    for fold in (order[k::folds] for k in range(folds)):
        own, own_messages = [Counter(), Counter()], [0, 0]  # the fold's own: [ham, spam]
        for i in fold:
            bkts, spam = samples[i]
            own[spam].update(bkts)
            own_messages[spam] += 1
        fh, fs = own
        nham, nspam = messages[0] - own_messages[0], messages[1] - own_messages[1]
        if nspam <= 0 or nham <= 0:
            continue  # (the other folds hold one class only: Fisher's method has no say)
        # the fold's tokens' counts in the other folds, packed as the store packs them
        # (spam << SHIFT | ham; by maps of C functions, no bytecode per token), and their
        # entries (f(w) and its logarithms) in a cache of the fold's own, made as the classify
        # path makes them (a count of 0: no evidence)
        toks = list(fs.keys() | fh.keys())
        spam_n = map(sub, map(sg, toks, repeat(0)), map(fs.get, toks, repeat(0)))
        ham_n = map(sub, map(hg, toks, repeat(0)), map(fh.get, toks, repeat(0)))
        packed = dict(zip(toks, map(or_, map(lshift, spam_n, repeat(SHIFT)), ham_n)))
        cache: dict = {}
        _token_logs(cache, [], packed, nspam, nham, p.robs, p.robx, p.min_dev, p.min_count,
                    None)
        for i in fold:
            out[i] = offset(_fisher([_cached_logs(cache, samples[i][0])[1]], p.n_eff)[0])
        del own, fh, fs, toks, packed, cache  # (before the next fold's: one fold at a time)
    return out
