#!/usr/bin/env python3
"""Classifier settings side by side, on all three splits of bench/bayes_bench.py, in seconds.

Tokenizes every corpus message once (kept in a cache file), counts training tokens in memory,
trains the linear model in memory (filterd.bayes.linear, as `filterd bayes train` does) and
scores each test message with filterd.bayes.classifier and the linear mix, the same arithmetic
the classify path uses; it reproduces bayes_bench.py's filterd figures exactly, without the
store or bogofilter. --no-linear: Fisher's score alone ([bayes] linear = false).
One line per setting: AUC and spam recall at FPR 0 / 0.1 % / 1 % for the date split, the
random split and 5-fold cross-validation.

    python bench/bayes_tune.py [CORPUS] [--try 'robs=0.1,min_dev=0.1'] [--try 'n_eff=30'] ...

Tune for generalisation, not for these files: a setting that gains on one split and loses on
another is noise. The token cache (in the temporary directory) is keyed by the corpus path and
the tokenizer's source, so editing the tokenizer starts a new one; --no-cache skips it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bayes_bench as bb  # noqa: E402

from filterd.bayes import classifier as C  # noqa: E402
from filterd.bayes import linear  # noqa: E402
from filterd.bayes import tokenizer as tokenizer_module  # noqa: E402
from filterd.bayes.tokenizer import TOKEN_FORMAT, tokenize  # noqa: E402

SPLITS = (("date", "date", 0), ("random", "random", 0), ("5-fold", "random", 5))


def token_sets(files: list[Path], cache: Path | None) -> dict[str, frozenset]:
    if cache and cache.exists():
        with open(cache, "rb") as f:
            fmt, toks = pickle.load(f)
        if fmt == TOKEN_FORMAT and all(str(p) in toks for p in files):
            return toks
    toks = {str(p): frozenset(tokenize(p.read_bytes())) for p in files}
    if cache:
        with open(cache, "wb") as f:
            pickle.dump((TOKEN_FORMAT, toks), f)
    return toks


def corpus_tokens(corpus: Path, use_cache: bool = True):
    """(ham files, spam files, token set of each file), the token sets kept in a cache file
    per corpus and tokenizer source (editing the tokenizer starts a new cache)."""
    ham, spam = bb.load_corpus(corpus)
    key = hashlib.sha256(str(corpus.resolve()).encode() + b"\0"
                         + Path(tokenizer_module.__file__).read_bytes()).hexdigest()[:16]
    cache = (Path(tempfile.gettempdir()) / f"filterd-bayes-tune-{os.getuid()}-{key}.pickle"
             if use_cache else None)
    return ham, spam, token_sets(ham + spam, cache)


def counted(trh, trs, toks) -> tuple[Counter, Counter]:
    """The training part's token counts: (spam, ham)."""
    sc, hc = Counter(), Counter()
    for p in trs:
        sc.update(toks[str(p)])
    for p in trh:
        hc.update(toks[str(p)])
    return sc, hc


def scores(ham, spam, toks, split: str, folds: int, params: C.Params, mix: bool = True):
    args = argparse.Namespace(seed=1, folds=folds, split=split, test_fraction=0.3)
    hs, ss = [], []
    for trh, trs, teh, tes in bb.splits(ham, spam, args):
        sc, hc = counted(trh, trs, toks)
        model = linear.Trainer(linear.zeros(), 0)
        if mix:  # (the order bayes_bench.py collects them in: spam, then ham)
            samples = ([(linear.hashes(toks[str(p)]), True) for p in trs]
                       + [(linear.hashes(toks[str(p)]), False) for p in trh])
            model.fit(samples, offsets=linear.fold_offsets(samples, params))
        weights = model.weights
        for files, out in ((teh, hs), (tes, ss)):
            for p in files:
                t = toks[str(p)]
                counts = {w: (sc.get(w, 0), hc.get(w, 0))
                          for w in t if w in sc or w in hc}
                f = C.classify(counts, len(trs), len(trh), params).probability
                if mix:  # (the weights of the learned tokens)
                    z = linear.margin(sum(weights[b] for b in linear.buckets(list(counts))),
                                      model.bias, len(t))
                    f = linear.mix(f, z)
                out.append(f)
    return hs, ss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", type=bb.corpus_dir, default=str(bb.DEFAULT_CORPUS))
    ap.add_argument("--try", dest="tries", action="append", default=[], metavar="K=V,K=V",
                    help="a setting of filterd.bayes.classifier.Params (the defaults always run)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-linear", action="store_true", help="Fisher's score alone")
    args = ap.parse_args(argv)
    corpus = args.corpus
    ham, spam, toks = corpus_tokens(corpus, not args.no_cache)
    settings = [("defaults", C.Params())]
    for t in args.tries:
        p = C.Params()
        for item in filter(None, (x.strip() for x in t.split(","))):
            k, _, v = item.partition("=")
            if not hasattr(p, k):
                print(f"unknown parameter {k!r} (Params has: {', '.join(vars(p))})",
                      file=sys.stderr)
                return 2
            setattr(p, k, type(getattr(p, k))(v))
        settings.append((t, p))
    print(f"{'setting':28s} | " + " | ".join(f"{n:^26s}" for n, _, _ in SPLITS))
    print(f"{'':28s} | " + " | ".join(f"{'AUC   r@0  r@.1%  r@1%':^26s}" for _ in SPLITS))
    for name, params in settings:
        cells = []
        for _, split, folds in SPLITS:
            f = bb.figures(*scores(ham, spam, toks, split, folds, params, not args.no_linear))
            cells.append(f"{f['auc']:.4f} {f['recall_fpr0'] * 100:5.1f} "
                         f"{f['recall_fpr0.1%'] * 100:5.1f} {f['recall_fpr1%'] * 100:5.1f}")
        print(f"{name[:28]:28s} | " + " | ".join(f"{c:^26s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
