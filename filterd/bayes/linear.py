"""The linear model: a weight per token bucket, learned discriminatively, mixed with Fisher's score.

Fisher's method (:mod:`.classifier`) scores a message from its tokens' counts. The messages it
gets wrong with confidence are hams whose tokens' counts say spam: commercial newsletters, a
mailing in a charset mostly seen in spam. A linear model trained on the same tokens learns
weights that correct for that, because it learns from its own mistakes rather than from counts;
mixed with Fisher's score it raised spam recall at 0.1 % false positives on the SpamAssassin
corpus from 90.0 to 93.2 % in 5-fold cross-validation (94.2-94.6 % with other seeds), from
78.0 to 97.3 % on a random split and from 96.7 to 98.0 % on the date split
(``bench/bayes_bench.py``; the experiment before it: ``bench/bayes_linear.py``; figures in
bench/README.md).

- **Weights.** :data:`BUCKETS` 32-bit integers (1 MiB) in the store as one counter array,
  ``<ns>linear<LAYOUT>`` (:meth:`filterd.store.Store.counters_get`); a weight is its integer
  times :data:`UNIT`. A token's bucket is a 64-bit hash of its UTF-8 bytes, low 18 bits
  (:func:`_bucket_py`; the hashing trick: tokens that share a bucket share a weight; measured:
  no loss against a weight per token). The bias is the meta field ``lbias`` (times :data:`UNIT`).
- **Margin** of a message of n tokens: ``z = UNIT * (bias + sum of its tokens' weights / √n)``,
  where a token never learned weighs nothing (whatever else shares its bucket).
- **Learning** (passive-aggressive, PA-I: Crammer et al., "Online Passive-Aggressive
  Algorithms", JMLR 2006): for a label y (+1 spam, -1 ham) the loss is ``1 - y z``; when it is
  above 0 the step is ``τ = min(C, loss / 2)``, each token's bucket gains ``round(τ y / √n /
  UNIT)`` and the bias ``round(τ y / UNIT)``. All in integers, so SQLite and Redis hold the same
  weights and give the same scores. Bulk training (``filterd bayes train``) makes
  :data:`PASSES` passes over all the messages it was given, ham and spam shuffled together
  (seeded: the same files give the same model); a single learn (autolearn, training by e-mail,
  quarantine release) makes one step. Forgetting a message leaves the weights (a step is not
  undone); relearning it as the other class steps towards that class.
- **Mixing:** ``p = σ(logit(f) / 5 + 2 z)`` for Fisher's probability f: the weights of the mix
  measured best (bench/bayes_linear.py, ``logit(f) / 10 + z``), scaled so that the usual
  bands (spam from 0.9, ham up to 0.2) keep their meaning: on the benchmark's splits, fewer
  hams at or above 0.9 and fewer spams below it than with Fisher's score alone.
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
UNIT = 1e-6  # a weight's resolution: stored as integers
LAYOUT = 1  # the key is "<ns>linear<LAYOUT>"; another layout (size, hash) starts afresh
C = 1.0  # PA-I's largest step
PASSES = 5  # passes of bulk training (one pass measured clearly worse)
SEED = 1  # the order of bulk training's passes
FISHER_SCALE = 0.2  # logit(f) * FISHER_SCALE + LINEAR_SCALE * z
LINEAR_SCALE = 2.0
_M64 = (1 << 64) - 1


def _bucket_py(token: str) -> int:
    """A token's bucket: its UTF-8 bytes as little-endian 64-bit words (the last one
    zero-padded), each mixed in with a multiply, then MurmurHash3's final mix (fmix64); a
    word at a time, where a CRC goes a byte at a time (tokens are short: the hash is most of
    the model's cost per message)."""
    b = token.encode("utf-8", "surrogatepass")
    h = 0x9E3779B97F4A7C15 ^ len(b)
    for i in range(0, len(b), 8):
        h = ((h ^ int.from_bytes(b[i:i + 8], "little")) * 0xFF51AFD7ED558CCD) & _M64
        h ^= h >> 32
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    h ^= h >> 33
    return h & MASK


def _buckets_py(tokens: Iterable[str]) -> list[int]:
    return [_bucket_py(t) for t in tokens]


buckets = getattr(_c, "linear_buckets", None) or _buckets_py


def zeros() -> array:
    return array("i", bytes(4 * BUCKETS))


def margin(total: int, bias: int, n: int) -> float:
    """z for a message of ``n`` tokens whose buckets' weights sum to ``total``."""
    return UNIT * (bias + total / math.sqrt(n)) if n else UNIT * bias


def step(z: float, spam: bool, n: int, c: float = C) -> tuple[int, int]:
    """PA-I's change for one message: (added to each token's bucket, added to the bias)."""
    y = 1.0 if spam else -1.0
    loss = 1.0 - y * z
    if loss <= 0.0 or n <= 0:
        return 0, 0
    tau = min(c, loss / 2.0)  # |x|² = 1 (the tokens, scaled) + 1 (the bias)
    return round(tau * y / math.sqrt(n) / UNIT), round(tau * y / UNIT)


def mix(fisher: float, z: float) -> float:
    """The reported probability: Fisher's ``fisher`` and the margin ``z`` mixed."""
    f = min(max(fisher, 1e-15), 1.0 - 1e-15)
    s = math.log(f / (1.0 - f)) * FISHER_SCALE + LINEAR_SCALE * z
    if s < -700.0:
        return 0.0
    return 1.0 / (1.0 + math.exp(-s))


def _step_py(weights: array, bkts: array, bias: int, spam: bool, c: float) -> tuple[int, int]:
    """One step for a message whose tokens' buckets are ``bkts`` (an ``array('I')``): its
    margin, PA-I's change (:func:`step`), the bucket change added to ``weights`` in place
    (saturating at the 32-bit limits); returns (bucket change, bias change). The C
    extension's ``linear_step`` does the same (the same weights: tests/test_bayes_speedups.py)."""
    n = len(bkts)
    dw, db = step(margin(sum(map(weights.__getitem__, bkts)), bias, n), spam, n, c)
    if dw:
        add_counters(weights, bkts, repeat(dw))
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

    def learn(self, bkts: array, spam: bool) -> None:
        """One step for a message (``bkts``: its tokens' buckets, an ``array('I')``)."""
        dw, db = _step(self.weights, bkts, self.bias, spam, C)
        self.messages += 1
        if dw:
            deltas = self.deltas
            for b in bkts:
                deltas[b] = deltas.get(b, 0) + dw
        self.bias += db
        self.bias_delta += db

    def fit(self, samples: list[tuple[array, bool]], passes: int = PASSES,
            seed: int = SEED) -> None:
        """``passes`` passes over ``(buckets, spam)`` samples, shuffled before each; the
        changes to write are the weights' differences at the end."""
        w = self.weights
        before = array("i", w)
        order = list(samples)
        rng = random.Random(seed)
        step_, bias, bias_delta = _step, self.bias, 0
        for _ in range(passes):
            rng.shuffle(order)
            for bkts, spam in order:
                dw, db = step_(w, bkts, bias, spam, C)
                bias += db
                bias_delta += db
        self.bias, self.bias_delta = bias, self.bias_delta + bias_delta
        deltas = self.deltas
        for i in (i for i, (a, b) in enumerate(zip(w, before)) if a != b):
            deltas[i] = deltas.get(i, 0) + w[i] - before[i]
        self.messages = len(samples)  # (messages trained on, not steps)
