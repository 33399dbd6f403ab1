"""Combining token evidence into a spam probability.

The method of Gary Robinson as used by SpamBayes and bogofilter:

1. per token, the raw spam probability from the training counts, corrected for the different
   numbers of spam and ham messages learned::

       p(w) = (s/S) / (s/S + h/H)

2. Robinson's f(w): a Bayesian estimate that pulls rare tokens toward the prior ``x`` with
   strength ``s`` (how many messages of evidence the prior is worth)::

       f(w) = (s*x + n*p(w)) / (s + n)        n = s + h (times the token was seen)

3. only tokens that say something (``|f(w) - 0.5| >= min_dev``) take part, the strongest
   ``max_tokens`` of them;
4. Fisher's method: two chi-square tests, one for "these probabilities are not from a spammy
   message" and one for "not from a hammy one"::

       S = 1 - C⁻¹(-2 Σ ln(1 - f(w)), 2N)       H = 1 - C⁻¹(-2 Σ ln f(w), 2N)
       probability = (1 + S - H) / 2

   which lands near 0 (ham), near 1 (spam) or near 0.5 when the evidence is weak or
   contradictory: the *unsure* band;
5. Fisher's test assumes independent evidence; the tokens of one message are not (the same
   story told by its words, its HTML and its headers), so a long message would reject both
   tests merely by its length and land on 0.5. With more than ``n_eff`` tokens both sums are
   scaled to ``n_eff`` tokens' worth and tested with ``2 n_eff`` degrees of freedom: the mean
   evidence per token decides (``n_eff = 50``, chosen by cross-validation; 0 = plain Fisher).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable


@dataclass
class Params:
    # Defaults chosen by 5-fold cross-validation on the SpamAssassin public corpus (see
    # bench/bayes_bench.py); robs/robx are bogofilter's long-standing defaults.
    robs: float = 0.0178  # strength of the prior (s)
    robx: float = 0.52  # the prior for a token seen rarely (x)
    min_dev: float = 0.2  # tokens closer than this to 0.5 are ignored
    max_tokens: int = 10000  # the strongest tokens used per message (tokenizer caps at 4000)
    min_count: int = 0  # tokens seen fewer times than this are ignored
    # The most tokens' worth of evidence Fisher's test counts: with more tokens both sums are
    # scaled down to this many (the tokens of one message are far from independent; without
    # it a long message rejects both hypotheses at once and lands on 0.5 whatever it is).
    # 0: no limit (plain Fisher).
    n_eff: int = 50


@dataclass
class Result:
    probability: float
    spam_evidence: float  # S
    ham_evidence: float  # H
    tokens_used: int
    clues: list[tuple[str, float]] = field(default_factory=list)  # strongest first
    # with the linear model mixed in (filterd/bayes/linear.py): Fisher's probability before
    # the mix and the model's margin; None when probability is Fisher's alone
    fisher: float | None = None
    margin: float | None = None


def chi2q(x2: float, v: int) -> float:
    """P(chisq >= x2) with ``v`` (even) degrees of freedom."""
    m = x2 / 2.0
    total = term = math.exp(-m)
    for i in range(1, v // 2):
        term *= m / i
        total += term
        if term < 1e-300:
            break
    return min(total, 1.0)


def _chi2q_log(log_sum: float, n: int) -> float:
    """chi2q(-2*log_sum, 2n) without underflow for long sums: the Poisson CDF
    P(X <= n-1), X ~ Poisson(m), m = -log_sum, summed outward from its largest term until the
    terms stop mattering (O(sqrt m) terms instead of n)."""
    m = -log_sum
    if m <= 0:
        return 1.0
    k = min(n - 1, int(m))  # the largest term of the sum
    t0 = math.exp(-m + k * math.log(m) - math.lgamma(k + 1))
    if t0 == 0.0:
        return 0.0
    total = t = t0
    for i in range(k, 0, -1):
        t *= i / m
        total += t
        if t < total * 1e-17:
            break
    t = t0
    for i in range(k + 1, n):
        t *= m / i
        total += t
        if t < total * 1e-17:
            break
    return min(total, 1.0)


def probabilities(counts: Iterable[tuple[str, int, int]], nspam: int, nham: int,
                  params: Params) -> dict[str, tuple[float, float, float]]:
    """token -> (f(w), ln f, ln(1 - f)) for the ``(token, spam, ham)`` counts that say something:
    seen at least ``min_count`` times and at least ``min_dev`` from 0.5 (f clamped to
    [1e-9, 1 - 1e-9]). The one place f(w) is computed; the classify path runs it for every
    learned token not yet in its cache."""
    robs, prior, min_dev, min_count = params.robs, params.robs * params.robx, params.min_dev, \
        params.min_count
    log = math.log
    out = {}
    for t, s, h in counts:
        n = s + h
        if n <= 0 or n < min_count:
            continue
        sr = s / nspam
        f = (prior + n * (sr / (sr + h / nham))) / (robs + n)
        if abs(f - 0.5) < min_dev:
            continue
        f = min(max(f, 1e-9), 1 - 1e-9)
        out[t] = (f, log(f), log(1.0 - f))
    return out


def classify(counts: dict[str, tuple[int, int]], nspam: int, nham: int,
             params: Params | None = None, explain: int = 0) -> Result:
    """Spam probability of a message from its tokens' ``(spam, ham)`` training counts
    (tokens never seen may be left out: they carry no evidence)."""
    params = params or Params()
    if nspam <= 0 or nham <= 0:
        return Result(0.5, 0.0, 0.0, 0)
    probs = probabilities(((t, s, h) for t, (s, h) in counts.items()), nspam, nham, params)
    # sorted always: the sums below then do not depend on the order the store returned
    # the counts in, so every backend gives bit-identical results
    scored = sorted(((abs(f - 0.5), f, tok) for tok, (f, _, _) in probs.items()), reverse=True)
    if len(scored) > params.max_tokens:
        scored = scored[:params.max_tokens]
    if not scored:
        return Result(0.5, 0.0, 0.0, 0)
    res = combine([f for _, f, _ in scored], 0, params.n_eff)
    if explain:
        res.clues = [(tok, f) for _, f, tok in scored[:explain]]
    return res


def combine(fs: list[float], max_tokens: int = 0, n_eff: int = 0) -> Result:
    """Fisher's combination of token probabilities. The sums are exact (``math.fsum``), so the
    result does not depend on the order the tokens came in (every backend gives bit-identical
    results)."""
    if max_tokens and len(fs) > max_tokens:
        fs = sorted(fs, key=lambda f: (-abs(f - 0.5), f))[:max_tokens]
    if not fs:
        return Result(0.5, 0.0, 0.0, 0)
    log = math.log
    return combine_logs(math.fsum(map(log, fs)), math.fsum([log(1.0 - f) for f in fs]), len(fs),
                        n_eff)


def combine_logs(log_h: float, log_s: float, n: int, n_eff: int = 0) -> Result:
    """Fisher's combination from ``Σ ln f`` (``log_h``) and ``Σ ln(1 - f)`` (``log_s``) of ``n``
    token probabilities (the classify fast path keeps both logarithms per token). With more
    than ``n_eff`` tokens (``n_eff`` > 0) both sums are scaled to ``n_eff`` tokens' worth and
    tested with that many degrees of freedom: the mean evidence per token decides, not the
    length of the message."""
    if n <= 0:
        return Result(0.5, 0.0, 0.0, 0)
    dof = n
    if 0 < n_eff < n:
        scale = n_eff / n
        log_h *= scale
        log_s *= scale
        dof = n_eff
    spam_ev = 1.0 - _chi2q_log(log_s, dof)
    ham_ev = 1.0 - _chi2q_log(log_h, dof)
    return Result((1.0 + spam_ev - ham_ev) / 2.0, spam_ev, ham_ev, n)


def band(p: float, ham_cutoff: float = 0.2, spam_cutoff: float = 0.9) -> str:
    """The symbol for a probability: BAYES_SPAM_HIGH (>= 0.99), BAYES_SPAM (>= spam_cutoff),
    BAYES_UNSURE, BAYES_HAM (<= ham_cutoff), BAYES_HAM_HIGH (<= 0.01)."""
    if p >= spam_cutoff:
        return "BAYES_SPAM_HIGH" if p >= 0.99 else "BAYES_SPAM"
    if p <= ham_cutoff:
        return "BAYES_HAM_HIGH" if p <= 0.01 else "BAYES_HAM"
    return "BAYES_UNSURE"
