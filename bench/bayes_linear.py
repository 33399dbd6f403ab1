#!/usr/bin/env python3
"""A linear model beside Fisher's method on the splits of bench/bayes_bench.py: an experiment.

Trains, on each split's training part and on the same token sets the classifier uses, an online
passive-aggressive linear model (PA-I, Crammer et al. 2006: each message's token vector scaled
to length 1, one update per message that leaves its margin short of 1, step at most C), and
prints AUC and spam recall at FPR 0 / 0.1 % / 1 % for Fisher's method alone (filterd's score
today), the linear model alone, and the two mixed: ``logit(fisher) / K + margin``. The weights
are rounded to multiples of 1e-6 before testing, as a store keeping them as integers would.

    python bench/bayes_linear.py [CORPUS] [--epochs 1,5] [--C 1] [--mix 10] [--seeds 1,2,3]

Not part of filterd: it measures whether a weight per token, learned discriminatively, is worth
a column beside the counts (see bench/README.md, "Bayes accuracy and speed").
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import zlib
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bayes_bench as bb  # noqa: E402
import bayes_tune as bt  # noqa: E402

from filterd.bayes import classifier as C  # noqa: E402

SPLITS = (("date", "date", 0), ("random", "random", 0), ("5-fold", "random", 5))
UNIT = 1e-6  # the weights' resolution, as integers in a store would keep them


def hashed(toks: frozenset, buckets: int) -> frozenset:
    """The tokens as bucket numbers (the hashing trick: a fixed array of weights)."""
    if not buckets:
        return toks
    return frozenset(zlib.crc32(t.encode("utf-8", "surrogatepass")) & (buckets - 1)
                     for t in toks)


def train_pa(items: list[tuple[frozenset, int]], c: float, epochs: int, seed: int):
    """PA-I over (tokens, ±1) pairs; returns (weights, bias). Order: shuffled per epoch."""
    rng = random.Random(seed)
    w: dict[str, float] = defaultdict(float)
    b = 0.0
    items = items[:]
    for _ in range(epochs):
        rng.shuffle(items)
        for toks, y in items:
            x = 1.0 / math.sqrt(len(toks) or 1)
            margin = y * (b + x * sum(w[t] for t in toks if t in w))
            loss = 1.0 - margin
            if loss <= 0.0:
                continue
            tau = min(c, loss / 2.0)  # |x|^2 = 1, plus 1 for the bias
            b += tau * y
            step = tau * y * x
            for t in toks:
                w[t] += step
    return {t: round(v / UNIT) * UNIT for t, v in w.items()}, round(b / UNIT) * UNIT


def margin(w: dict, b: float, toks: frozenset) -> float:
    return b + sum(w.get(t, 0.0) for t in toks) / math.sqrt(len(toks) or 1)


def run(ham, spam, toks, split, folds, seed, epochs, c, mixes, buckets=0):
    args = argparse.Namespace(seed=seed, folds=folds, split=split, test_fraction=0.3)
    names = ["fisher", "linear"] + [f"mix/{k:g}" for k in mixes]
    res = {n: ([], []) for n in names}
    for trh, trs, teh, tes in bb.splits(ham, spam, args):
        sc, hc = bt.counted(trh, trs, toks)
        w, b = train_pa([(hashed(toks[str(p)], buckets), -1) for p in trh]
                        + [(hashed(toks[str(p)], buckets), 1) for p in trs], c, epochs, seed)
        for files, i in ((teh, 0), (tes, 1)):
            for p in files:
                t = toks[str(p)]
                counts = {x: (sc.get(x, 0), hc.get(x, 0)) for x in t if x in sc or x in hc}
                f = C.classify(counts, len(trs), len(trh)).probability
                z = margin(w, b, hashed(t, buckets))
                res["fisher"][i].append(f)
                res["linear"][i].append(z)
                lf = math.log(max(f, 1e-15) / max(1.0 - f, 1e-15))
                for k in mixes:
                    res[f"mix/{k:g}"][i].append(lf / k + z)
    return {n: bb.figures(*v) for n, v in res.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", type=bb.corpus_dir, default=str(bb.DEFAULT_CORPUS))
    ap.add_argument("--epochs", default="5", help="comma-separated: passes over the training part")
    ap.add_argument("--C", dest="c", default="1", help="comma-separated: PA-I's largest step")
    ap.add_argument("--mix", default="10", help="comma-separated K of logit(fisher)/K + margin")
    ap.add_argument("--buckets", type=int, default=0,
                    help="weights in an array of this many (a power of 2), indexed by the "
                         "token's CRC-32 (0: a weight per token)")
    ap.add_argument("--seeds", default="1", help="comma-separated split seeds (and PA's order)")
    args = ap.parse_args(argv)
    corpus = args.corpus
    ham, spam, toks = bt.corpus_tokens(corpus)
    mixes = [float(k) for k in args.mix.split(",")]
    print(f"{'split':8s} {'seed':>4s} {'epochs':>6s} {'C':>5s}  {'scores':10s} "
          f"{'AUC':>7s} {'r@0':>6s} {'r@.1%':>6s} {'r@1%':>6s}")
    for seed in (int(s) for s in args.seeds.split(",")):
        for epochs in (int(e) for e in args.epochs.split(",")):
            for c in (float(x) for x in args.c.split(",")):
                for name, split, folds in SPLITS:
                    if split == "date" and seed != int(args.seeds.split(",")[0]):
                        continue  # (the date split has no seed)
                    for n, f in run(ham, spam, toks, split, folds, seed, epochs, c,
                                    mixes, args.buckets).items():
                        print(f"{name:8s} {seed:4d} {epochs:6d} {c:5g}  {n:10s} "
                              f"{f['auc']:7.4f} {f['recall_fpr0'] * 100:6.1f} "
                              f"{f['recall_fpr0.1%'] * 100:6.1f} "
                              f"{f['recall_fpr1%'] * 100:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
