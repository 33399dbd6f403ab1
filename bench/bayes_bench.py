#!/usr/bin/env python3
"""Accuracy and speed of filterd's Bayesian classifier, with bogofilter beside it.

Trains both on the same part of a corpus and tests both on the rest, then prints AUC, spam recall
at false-positive rates 0, 0.1 % and 1 %, and training / classification speed (messages per
second, one process each, files read from disk by each system). Speed is given as wall-clock
msg/s and as messages per CPU-second (user + system time of our process / of the bogofilter
children), which stays meaningful on a busy machine.

    python bench/bayes_bench.py [CORPUS] [--seed 1] [--test-fraction 0.3] [--folds K]
                                [--split random|date] [--store sqlite|redis] [--repeat 3]
                                [--json]

Classification is timed ``--repeat`` times for each system, the two taking turns, and each
system's fastest pass counts (each pass of filterd starts with an empty token cache, each of
bogofilter with new processes): on a shared machine one pass of a few hundred milliseconds
measured up to 1.5x apart from the next, for bogofilter as for filterd.

CORPUS (default ../shared/testdata/corpus/spamassassin, relative to the project) holds
sub-directories of one-message files; those named *ham* are ham, those named *spam* are spam.
``--split date`` trains on the earlier mail (by Date header) and tests on the later, which is
closer to real use. ``--folds K`` runs K-fold cross-validation and prints pooled figures.
Needs the Debian ``bogofilter`` package (skipped with a note when absent).
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from filterd.bayes import Bayes, Params  # noqa: E402
from filterd.store.sqlite import SQLiteStore  # noqa: E402


def _default_corpus() -> Path:
    """../shared/testdata/corpus/spamassassin next to the project ($FILTERD_SHARED wins; a git
    worktree one level deeper also finds it)."""
    tail = Path("testdata") / "corpus" / "spamassassin"
    if os.environ.get("FILTERD_SHARED"):
        return Path(os.environ["FILTERD_SHARED"]) / tail
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / tail).is_dir():
            return base / "shared" / tail
    return ROOT.parent / "shared" / tail


DEFAULT_CORPUS = _default_corpus()


def corpus_dir(value: str) -> Path:
    """The corpus argument of the Bayes benchmarks (argparse's type: a missing folder is a
    usage error, exit status 2)."""
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"corpus {path} not found (give its path as the first argument)")
    return path


# -- corpus -------------------------------------------------------------------------------------
def load_corpus(path: Path) -> tuple[list[Path], list[Path]]:
    ham, spam = [], []
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith("."))
        if "spam" in d.name.lower():
            spam += files
        elif "ham" in d.name.lower():
            ham += files
    return ham, spam


_DATE_RE = re.compile(rb"(?im)^Date:[ \t]*(.+)$")


def msg_time(p: Path) -> float:
    head = p.read_bytes()[:20000]
    m = _DATE_RE.search(head)
    if m:
        try:
            return email.utils.parsedate_to_datetime(
                m.group(1).decode("latin-1").strip()).timestamp()
        except Exception:  # noqa: BLE001
            pass
    return 0.0


def splits(ham, spam, args):
    """Yield (train_ham, train_spam, test_ham, test_spam) per fold."""
    rng = random.Random(args.seed)
    if args.folds and args.folds > 1:
        h, s = ham[:], spam[:]
        rng.shuffle(h)
        rng.shuffle(s)
        for k in range(args.folds):
            th = [x for i, x in enumerate(h) if i % args.folds == k]
            ts = [x for i, x in enumerate(s) if i % args.folds == k]
            yield ([x for i, x in enumerate(h) if i % args.folds != k],
                   [x for i, x in enumerate(s) if i % args.folds != k], th, ts)
        return
    if args.split == "date":
        def cut(files):
            files = sorted(files, key=msg_time)
            n = int(len(files) * (1 - args.test_fraction))
            return files[:n], files[n:]
    else:
        def cut(files):
            files = files[:]
            rng.shuffle(files)
            n = int(len(files) * (1 - args.test_fraction))
            return files[:n], files[n:]
    trh, teh = cut(ham)
    trs, tes = cut(spam)
    yield trh, trs, teh, tes


# -- metrics ------------------------------------------------------------------------------------
def auc(ham_scores, spam_scores) -> float:
    """Mann-Whitney AUC, ties counted half."""
    allv = sorted([(v, 0) for v in ham_scores] + [(v, 1) for v in spam_scores])
    ranks = [0.0] * len(allv)
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and allv[j + 1][0] == allv[i][0]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = r
        i = j + 1
    rs = sum(r for r, (_, lab) in zip(ranks, allv) if lab == 1)
    ns, nh = len(spam_scores), len(ham_scores)
    return (rs - ns * (ns + 1) / 2) / (ns * nh)


def recall_at_fpr(ham_scores, spam_scores, fpr: float) -> float:
    """Spam recall with a threshold that lets at most fpr*N hams through as spam; a spam tied
    with the highest allowed ham counts as missed (conservative)."""
    hs = sorted(ham_scores, reverse=True)
    k = int(fpr * len(hs) + 1e-9)  # false positives allowed
    if k >= len(hs):
        return 1.0
    thr = hs[k]  # scores must be strictly above the (k+1)-th highest ham
    return sum(1 for s in spam_scores if s > thr) / len(spam_scores)


# -- filterd ------------------------------------------------------------------------------------
class FilterdRun:
    """filterd's classifier on one split: train once, then classify the test messages as many
    times as asked, each pass with an empty token cache (a new Bayes object on the same open
    store, as a gateway holds its store open and empties its token cache now and then), so
    that passes can be compared and the fastest kept."""

    def __init__(self, store_kind: str, tmp: Path, params=None):
        import uuid

        self.params = params
        self.loop = asyncio.new_event_loop()  # one loop: a Redis store's connections live on it
        if store_kind == "redis":
            from filterd.store.redis import RedisStore

            self.store = RedisStore("redis://127.0.0.1:6379/0",
                                    prefix=f"filterd-bench-{uuid.uuid4().hex}:")
        else:
            self.store = SQLiteStore(tmp / "filterd-bayes.sqlite")
        self.redis = store_kind == "redis"

    @staticmethod
    def _read(files):
        for f in files:
            yield f.read_bytes()

    def train(self, train_ham, train_spam) -> tuple[float, float]:
        async def run():
            bayes = Bayes(self.store, params=self.params)
            t0, c0 = time.perf_counter(), time.process_time()
            samples: list = []  # (as filterd bayes train: the linear model once both are in)
            await bayes.learn(self._read(train_spam), spam=True, collect=samples)
            await bayes.learn(self._read(train_ham), spam=False, collect=samples)
            await bayes.fit_linear(samples)
            return time.perf_counter() - t0, time.process_time() - c0
        return self.loop.run_until_complete(run())

    def classify(self, test) -> tuple[list[float], tuple[float, float]]:
        async def run():
            bayes = Bayes(self.store, params=self.params)
            t0, c0 = time.perf_counter(), time.process_time()
            scores = [(await bayes.classify(f.read_bytes())).probability for f in test]
            return scores, (time.perf_counter() - t0, time.process_time() - c0)
        return self.loop.run_until_complete(run())

    def close(self) -> None:
        async def run():
            if self.redis:
                await Bayes(self.store).tokens.clear()
            await self.store.close()
        try:
            self.loop.run_until_complete(run())
        finally:
            self.loop.close()


# -- bogofilter ---------------------------------------------------------------------------------
def child_cpu() -> float:
    """CPU seconds (user + system) used by finished child processes."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bogofilter_bulk(d: Path, flag: list[str], files) -> str:
    """bogofilter with word list directory ``d`` and ``flag`` (-s/-n to train, -T to classify)
    on ``files``: their names as arguments (-B, bulk mode), in chunks that keep the command
    line short. Returns what it printed."""
    out = []
    for i in range(0, len(files), 1000):
        p = subprocess.run(["bogofilter", "-d", str(d), *flag, "-B",
                            *map(str, files[i:i + 1000])],
                           capture_output=True, text=True)
        if p.returncode not in (0, 1, 2):  # spam, ham, unsure
            raise RuntimeError(f"bogofilter failed ({p.returncode}): {p.stderr.strip()}")
        out.append(p.stdout)
    return "".join(out)


class BogofilterRun:
    """bogofilter on one split, with its word list in ``tmp``: train once, classify as often
    as asked (each pass new bogofilter processes, as ``-B`` bulk mode runs them)."""

    def __init__(self, tmp: Path):
        self.d = tmp / "bogo"
        self.d.mkdir()

    def train(self, train_ham, train_spam) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), child_cpu()
        bogofilter_bulk(self.d, ["-s"], train_spam)
        bogofilter_bulk(self.d, ["-n"], train_ham)
        return time.perf_counter() - t0, child_cpu() - c0

    def classify(self, test) -> tuple[list[float], tuple[float, float]]:
        t0, c0 = time.perf_counter(), child_cpu()
        out = bogofilter_bulk(self.d, ["-T"], test)
        t = (time.perf_counter() - t0, child_cpu() - c0)
        by_file = {}
        for line in out.splitlines():
            # "<file> S 0.999876" (-T: terse; several lines when a file is an mbox)
            name, _, rest = line.rpartition(" ")
            name = name.rsplit(" ", 1)[0]
            by_file[name] = float(rest)
        return [by_file[str(f)] for f in test], t

    def close(self) -> None:
        pass


def figures(ham_scores, spam_scores):
    return {"auc": auc(ham_scores, spam_scores),
            "recall_fpr0": recall_at_fpr(ham_scores, spam_scores, 0.0),
            "recall_fpr0.1%": recall_at_fpr(ham_scores, spam_scores, 0.001),
            "recall_fpr1%": recall_at_fpr(ham_scores, spam_scores, 0.01)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", type=corpus_dir, default=str(DEFAULT_CORPUS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--folds", type=int, default=0, help="K-fold cross-validation (K >= 2)")
    ap.add_argument("--split", choices=("random", "date"), default="random")
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    ap.add_argument("--no-bogofilter", action="store_true")
    ap.add_argument("--repeat", type=int, default=3,
                    help="classify the test messages this many times with each system, taking "
                         "turns, and count each system's fastest pass (default 3; training "
                         "is timed once)")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="classifier parameter (robs, robx, min_dev, max_tokens, n_eff), "
                         "for tuning")
    args = ap.parse_args(argv)
    corpus = args.corpus
    ham, spam = load_corpus(corpus)
    params = Params()
    for item in args.param:
        k, _, v = item.partition("=")
        setattr(params, k, type(getattr(params, k))(v))
    if not ham or not spam:
        print(f"corpus {corpus}: need sub-directories named *ham* and *spam*", file=sys.stderr)
        return 2
    bogo = not args.no_bogofilter and shutil.which("bogofilter")
    if not bogo and not args.no_bogofilter:
        print("note: bogofilter not installed (apt-get install bogofilter); reference skipped")
    res = {n: {"ham": [], "spam": [], "train": [0, 0.0, 0.0], "class": [0, 0.0, 0.0]}
           for n in ("filterd", "bogofilter")}
    for fold, (trh, trs, teh, tes) in enumerate(splits(ham, spam, args), 1):
        test = teh + tes
        with tempfile.TemporaryDirectory(prefix="bayes-bench-") as tmp:
            tmp = Path(tmp)
            systems = {"filterd": FilterdRun(args.store, tmp, params)}
            if bogo:
                systems["bogofilter"] = BogofilterRun(tmp)
            try:
                for name, system in systems.items():
                    t_train = system.train(trh, trs)
                    r = res[name]
                    r["train"][0] += len(trh) + len(trs)
                    r["train"][1] += t_train[0]
                    r["train"][2] += t_train[1]
                # the classification passes take turns (each pass starts with the other
                # system), and each system's fastest pass by CPU counts: this machine's noise
                # only ever adds time
                best: dict[str, tuple[float, float]] = {}
                order = list(systems)
                for i in range(max(1, args.repeat)):
                    for name in order[i % len(order):] + order[:i % len(order)]:
                        scores, t_class = systems[name].classify(test)
                        if i == 0:
                            res[name]["ham"] += scores[:len(teh)]
                            res[name]["spam"] += scores[len(teh):]
                        if name not in best or t_class[1] < best[name][1]:
                            best[name] = t_class
                for name, t_class in best.items():
                    r = res[name]
                    r["class"][0] += len(test)
                    r["class"][1] += t_class[0]
                    r["class"][2] += t_class[1]
            finally:
                for system in systems.values():
                    system.close()
        print(f"fold {fold}: trained on {len(trh)} ham + {len(trs)} spam, "
              f"tested on {len(teh)} ham + {len(tes)} spam", file=sys.stderr)

    out = {"corpus": str(corpus), "split": f"{args.folds}-fold" if args.folds > 1 else args.split,
           "seed": args.seed, "store": args.store}
    names = ["filterd"] + (["bogofilter"] if bogo else [])
    for name in names:
        r = res[name]
        f = figures(r["ham"], r["spam"])
        f["train_msg_s"] = r["train"][0] / r["train"][1] if r["train"][1] else 0.0
        f["class_msg_s"] = r["class"][0] / r["class"][1] if r["class"][1] else 0.0
        f["train_msg_cpu_s"] = r["train"][0] / r["train"][2] if r["train"][2] else 0.0
        f["class_msg_cpu_s"] = r["class"][0] / r["class"][2] if r["class"][2] else 0.0
        f["test_ham"], f["test_spam"] = len(r["ham"]), len(r["spam"])
        f["false_pos_at_0.9"] = sum(1 for v in r["ham"] if v >= 0.9)
        f["false_neg_at_0.9"] = sum(1 for v in r["spam"] if v < 0.9)
        out[name] = f
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"corpus {corpus}  split={out['split']} seed={args.seed} store={args.store}")
    print(f"test set: {out['filterd']['test_ham']} ham, {out['filterd']['test_spam']} spam")
    rows = [("AUC", "auc", "{:.4f}"), ("spam recall @ FPR 0", "recall_fpr0", "{:.1%}"),
            ("spam recall @ FPR 0.1%", "recall_fpr0.1%", "{:.1%}"),
            ("spam recall @ FPR 1%", "recall_fpr1%", "{:.1%}"),
            ("ham >= 0.9 (FP)", "false_pos_at_0.9", "{}"),
            ("spam < 0.9 (FN)", "false_neg_at_0.9", "{}"),
            ("training msg/s (wall)", "train_msg_s", "{:.0f}"),
            ("classification msg/s (wall)", "class_msg_s", "{:.0f}"),
            ("training msg/CPU-s", "train_msg_cpu_s", "{:.0f}"),
            ("classification msg/CPU-s", "class_msg_cpu_s", "{:.0f}")]
    print(f"{'':30}{'filterd':>12}" + (f"{'bogofilter':>12}{'ratio':>9}" if bogo else ""))
    for label, key, fmt in rows:
        line = f"{label:30}{fmt.format(out['filterd'][key]):>12}"
        if bogo:
            b = out["bogofilter"][key]
            line += f"{fmt.format(b):>12}"
            if "msg" in key and b:
                line += f"{out['filterd'][key] / b:>8.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
