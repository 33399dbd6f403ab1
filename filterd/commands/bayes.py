"""``filterd bayes``: train, inspect and query the Bayesian classifier.

    filterd bayes train [--reset] --spam PATH... --ham PATH...   bulk training (directories,
                                                       mbox, Maildir; --reset: start afresh)
    filterd bayes learn --spam|--ham [FILE...]         learn single messages (scripts; stdin)
    filterd bayes forget FILE...                       unlearn messages learned before
    filterd bayes classify [--json] FILE...            spam probability per message
    filterd bayes stats [--top N]                      what the database holds

Every subcommand takes ``--db PATH``: an SQLite token file used instead of the configured store,
so the classifier works outside a configured gateway.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from ..bayes import Bayes, linear, presence
from ..bayes.classifier import band
from ..bayes.engine import LearnStats
from ..bayes.tokenizer import TOKEN_FORMAT

EPILOG = """PATH may be a directory of one-message files (searched recursively), a Maildir
(cur/ and new/ are read), an mbox file, a single message file, or - for standard input.
--db PATH uses that SQLite token file instead of the configured store ([store])."""


def register(sub, common) -> None:
    import argparse

    p = sub.add_parser("bayes", parents=[common], help="train and query the Bayesian classifier",
                       description=__doc__.split("\n\n")[0])
    bsub = p.add_subparsers(dest="bayes_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    def db_arg(sp):
        sp.add_argument("--db", metavar="PATH",
                        help="SQLite token file to use instead of the configured store")

    t = bsub.add_parser("train", parents=[common], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="learn many messages: --spam PATH and/or --ham PATH (repeatable)")
    t.add_argument("--spam", action="append", default=[], metavar="PATH")
    t.add_argument("--ham", action="append", default=[], metavar="PATH")
    t.add_argument("--reset", action="store_true",
                   help="empty the token database first (retrain from scratch, e.g. after an "
                        "upgrade that changed the tokenizer)")
    t.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    db_arg(t)
    t.set_defaults(func=cmd_train)

    le = bsub.add_parser("learn", parents=[common], epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         help="learn single messages as spam or ham (for scripts)")
    g = le.add_mutually_exclusive_group(required=True)
    g.add_argument("--spam", dest="kind", action="store_const", const="spam")
    g.add_argument("--ham", dest="kind", action="store_const", const="ham")
    le.add_argument("files", nargs="*", default=["-"], metavar="FILE")
    db_arg(le)
    le.set_defaults(func=cmd_learn)

    fo = bsub.add_parser("forget", parents=[common], help="unlearn messages learned before")
    fo.add_argument("files", nargs="+", metavar="FILE")
    db_arg(fo)
    fo.set_defaults(func=cmd_forget)

    c = bsub.add_parser("classify", parents=[common], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="print the spam probability of messages")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--json", action="store_true",
                   help="one JSON object per line: file, probability, symbol (and index for "
                        "messages inside an mbox)")
    c.add_argument("--explain", type=int, default=0, metavar="N",
                   help="also show the N strongest tokens")
    db_arg(c)
    c.set_defaults(func=cmd_classify)

    s = bsub.add_parser("stats", parents=[common], help="show what the token database holds")
    s.add_argument("--top", type=int, default=0, metavar="N",
                   help="also list the N most frequent spam and ham tokens")
    s.add_argument("--json", action="store_true")
    db_arg(s)
    s.set_defaults(func=cmd_stats)


# -- opening the database --------------------------------------------------------------------
class Opened:
    def __init__(self, args):
        from ..pipeline import load_config_and_plugins

        self.config, _ = load_config_and_plugins(args.config, args.overrides)
        sect = self.config.section("bayes")
        self.options = sect if isinstance(sect, dict) else {}
        if getattr(args, "db", None):
            from ..store.sqlite import SQLiteStore

            self.store = SQLiteStore(args.db)
            self.where = f"SQLite file {args.db}"
        else:
            from ..store import open_store

            self.store = open_store(self.config)
            self.where = describe_store(self.config)
        self.bayes = Bayes.from_options(self.store, self.options)

    async def close(self):
        await self.store.close()


def open_db(args, cmd: str) -> "Opened | None":
    """The database, or None after telling why it cannot be opened."""
    from ..store import StoreError

    try:
        return Opened(args)
    except (StoreError, OSError) as exc:
        what = exc if isinstance(exc, StoreError) else f"cannot open the token store: {exc}"
        print(f"filterd bayes {cmd}: {what} (use --db PATH for a token file of your own)",
              file=sys.stderr)
        return None


def describe_store(config) -> str:
    if config.get("store.backend") == "redis":
        return (f"Redis {str(config.get('store.url')).split('@')[-1]} "
                f"prefix {config.get('store.prefix')}")
    return f"SQLite file {config.path('store.path', 'store.sqlite')}"


# -- reading messages ------------------------------------------------------------------------
_FROM_LINE = re.compile(rb"^From \S*.*$")


def _strip_from_line(data: bytes) -> bytes:
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        return data[nl + 1:] if nl >= 0 else b""
    return data


def split_mbox(data: bytes) -> list[bytes]:
    """Messages of an mbox (``From `` lines after an empty line separate them; mboxrd
    ``>From`` quoting is undone)."""
    out, cur = [], []
    prev_blank = True
    for line in data.splitlines(keepends=True):
        if prev_blank and line.startswith(b"From ") and _FROM_LINE.match(line.rstrip(b"\r\n")):
            if cur:
                out.append(b"".join(cur))
            cur = []
            prev_blank = False
            continue
        if line.startswith(b">") and line.lstrip(b">").startswith(b"From "):
            line = line[1:]
        cur.append(line)
        prev_blank = line in (b"\n", b"\r\n")
    if cur:
        out.append(b"".join(cur))
    # the separator's preceding blank line belongs to the mbox format, not to the message
    return [m[:-1] if m.endswith(b"\n\n") else m for m in out]


def _is_mbox(data: bytes) -> bool:
    return data.startswith(b"From ") and re.search(rb"\n\r?\nFrom \S", data) is not None


def message_files(path: str) -> list[Path]:
    """The files a PATH stands for (a Maildir's cur/ and new/, or a directory tree)."""
    p = Path(path)
    if p.is_dir():
        if (p / "cur").is_dir() or (p / "new").is_dir():
            files = [f for sub in ("cur", "new") if (p / sub).is_dir()
                     for f in sorted((p / sub).iterdir()) if f.is_file()]
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
        return files
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"{path}: no such file or directory")


class MessageFiles:
    """``(file, messages)`` for each FILE argument of a command; a file that cannot be read is
    reported on stderr, skipped, and remembered in ``failed`` (the command then exits 1)."""

    def __init__(self, files, cmd: str):
        self.files, self.cmd, self.failed = files, cmd, False

    def __iter__(self):
        for f in self.files:
            try:
                msgs = read_messages(f)
            except OSError as exc:
                print(f"filterd bayes {self.cmd}: cannot read {f}: {exc.strerror or exc}",
                      file=sys.stderr)
                self.failed = True
                continue
            yield f, msgs


def read_messages(path: Path | str) -> list[bytes]:
    """The messages in one file (an mbox gives several) or on stdin ("-")."""
    data = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    if _is_mbox(data):
        return split_mbox(data)
    return [_strip_from_line(data)]


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label:5} [{bar:<30}] {self.done}/{self.total} "
                             f"{frac:4.0%} {rate:6.0f} msg/s")
        else:
            sys.stderr.write(f"\r{self.label:5} {self.done} messages {rate:6.0f} msg/s")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self.done:
            self.last = 0
            self.total = max(self.total, self.done)
            self(0)
            sys.stderr.write("\n")


# -- subcommands -----------------------------------------------------------------------------
async def cmd_train(args) -> int:
    if not args.spam and not args.ham:
        print("filterd bayes train: give --spam PATH and/or --ham PATH", file=sys.stderr)
        return 2
    jobs = []
    try:
        for kind, paths in (("spam", args.spam), ("ham", args.ham)):
            for path in paths:
                jobs.append((kind, path, message_files(path)))
    except FileNotFoundError as exc:
        print(f"filterd bayes train: {exc}", file=sys.stderr)
        return 1
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    db = open_db(args, "train")
    if db is None:
        return 1
    total = LearnStats()
    t0 = time.monotonic()
    n = 0
    try:
        if args.reset:
            nspam, nham = await db.bayes.tokens.totals()
            await db.bayes.tokens.clear()
            print(f"database ({db.where}): emptied ({nspam} spam, {nham} ham were learned)")
        samples: list = []  # the linear model's, trained once every class is counted
        for kind, path, files in jobs:
            bar = Progress(kind, len(files), show)
            errors: list[str] = []

            def messages():
                for f in files:
                    try:
                        msgs = read_messages(f)
                    except OSError as exc:
                        errors.append(f"{f}: {exc.strerror or exc}")
                        bar(1)
                        continue
                    yield from msgs
                    bar(1)

            stats = await db.bayes.learn(messages(), kind == "spam", collect=samples)
            bar.finish()
            for e in errors:
                print(f"filterd bayes train: cannot read {e}", file=sys.stderr)
            stats.failed += len(errors)
            n += stats.learned + stats.relearned + stats.already
            print(f"{kind}: {path}: {stats.learned} learned, {stats.relearned} relearned, "
                  f"{stats.already} already known, {stats.failed} failed")
            total += stats
        if samples:
            t1 = time.monotonic()
            await db.bayes.fit_linear(samples)
            print(f"linear model: {len(samples)} messages, {linear.PASSES} passes in "
                  f"{time.monotonic() - t1:.1f}s")
        nspam, nham = await db.bayes.tokens.totals()
        old = db.bayes.tokens.outdated(nspam, nham)
    finally:
        await db.close()
    dt = time.monotonic() - t0
    if old:
        print(f"warning: {db.bayes.tokens.outdated_note(old, nspam + nham)}", file=sys.stderr)
    print(f"database ({db.where}): {nspam} spam, {nham} ham; "
          f"{n} messages in {dt:.1f}s ({n / max(dt, 1e-6):.0f} msg/s)")
    return 1 if total.failed and not (total.learned or total.relearned or total.already) else 0


async def cmd_learn(args) -> int:
    db = open_db(args, "learn")
    if db is None:
        return 1
    files = MessageFiles(args.files, "learn")
    try:
        for f, msgs in files:
            stats = await db.bayes.learn(msgs, args.kind == "spam")
            print(f"{f}: {stats.outcome} as {args.kind}"
                  + (f" ({len(msgs)} messages)" if len(msgs) > 1 else ""))
    finally:
        await db.close()
    return 1 if files.failed else 0


async def cmd_forget(args) -> int:
    db = open_db(args, "forget")
    if db is None:
        return 1
    files = MessageFiles(args.files, "forget")
    try:
        for f, msgs in files:
            for m in msgs:
                ok = await db.bayes.forget(m)
                print(f"{f}: {'forgotten' if ok else 'was not learned'}")
    finally:
        await db.close()
    return 1 if files.failed else 0


async def cmd_classify(args) -> int:
    db = open_db(args, "classify")
    if db is None:
        return 1
    ham_cut = float(db.options.get("ham_cutoff", 0.2))
    spam_cut = float(db.options.get("spam_cutoff", 0.9))
    files = MessageFiles(args.files, "classify")
    try:
        state = await db.bayes.tokens.state()
        totals = state[:2]
        if not args.json and (totals[0] == 0 or totals[1] == 0):
            print(f"note: the database ({db.where}) has {totals[0]} spam and {totals[1]} ham: "
                  "train it first (filterd bayes train)", file=sys.stderr)
        old = db.bayes.tokens.outdated(*totals)
        if old:
            print(f"warning: {db.bayes.tokens.outdated_note(old, sum(totals))}",
                  file=sys.stderr)
        for f, msgs in files:
            for i, m in enumerate(msgs):
                res = await db.bayes.classify(m, explain=args.explain, state=state)
                sym = band(res.probability, ham_cut, spam_cut)
                if args.json:
                    d = {"file": str(f), "probability": round(res.probability, 6),
                         "symbol": sym, "tokens": res.tokens_used}
                    if len(msgs) > 1:
                        d["index"] = i
                    if args.explain:
                        d["clues"] = [[t, round(p, 4)] for t, p in res.clues]
                    print(json.dumps(d, ensure_ascii=False), flush=False)
                else:
                    name = f"{f}#{i}" if len(msgs) > 1 else str(f)
                    print(f"{name}\t{res.probability:.6f}\t{sym}")
                    for t, p in res.clues:
                        print(f"    {p:.4f} {t}")
    finally:
        await db.close()
    return 1 if files.failed else 0


async def cmd_stats(args) -> int:
    db = open_db(args, "stats")
    if db is None:
        return 1
    try:
        nspam, nham = await db.bayes.tokens.totals()
        old = db.bayes.tokens.outdated(nspam, nham)
        toks = await db.bayes.tokens.all_tokens()
        bitmap = await db.bayes.tokens.presence()
        weights = await db.bayes.tokens.linear_weights()
    finally:
        await db.close()
    tokens_db = db.bayes.tokens
    lmsgs, ready = tokens_db.linear_messages, tokens_db.linear_ready(nspam, nham)
    fill, fpr = (presence.fill(bitmap), presence.false_positive_rate(bitmap)) if bitmap else (
        None, None)
    only_spam = sum(1 for s, h in toks.values() if s and not h)
    only_ham = sum(1 for s, h in toks.values() if h and not s)
    d = {"database": db.where, "namespace": db.bayes.tokens.ns, "spam_messages": nspam,
         "ham_messages": nham, "tokens": len(toks), "tokens_only_in_spam": only_spam,
         "tokens_only_in_ham": only_ham, "token_format": TOKEN_FORMAT,
         "messages_learned_with_older_format": old,
         "presence_filter_fill": round(fill, 4) if bitmap else None,
         "presence_filter_false_positive_rate": fpr,
         "trained": nspam >= int(db.options.get("min_spam", 100))
         and nham >= int(db.options.get("min_ham", 100)),
         "linear_model": {"enabled": db.bayes.linear, "messages": lmsgs, "used": ready,
                          "bias": tokens_db.linear_bias * linear.UNIT,
                          "buckets_set": len(weights) - weights.count(0)}}
    if not db.bayes.linear:
        lin = "off ([bayes] linear = false): the probability is Fisher's alone"
    elif ready:
        lin = (f"trained on {lmsgs} messages, mixed into the probability "
               f"({d['linear_model']['buckets_set']} of {linear.BUCKETS} weights set)")
    else:
        lin = (f"trained on {lmsgs} messages, not used yet (it needs at least half as many as "
               f"the {nspam + nham} counted: run filterd bayes train again over the corpus)")
    if bitmap is None:
        filt = "not built yet (the next learn builds it; until then every token is looked up)"
    else:
        filt = (f"{fill:.1%} of its bits set (about 1 in {max(1, round(1 / fpr)):,} "
                "never-learned tokens is looked up anyway)" if fpr else "empty")
    if args.top:
        d["top_spam"] = [[t, s, h] for t, (s, h) in
                         sorted(toks.items(), key=lambda kv: -kv[1][0])[:args.top]]
        d["top_ham"] = [[t, s, h] for t, (s, h) in
                        sorted(toks.items(), key=lambda kv: -kv[1][1])[:args.top]]
    if args.json:
        print(json.dumps(d, ensure_ascii=False))
        return 0
    print(f"database:      {d['database']} (namespace {d['namespace']})")
    print(f"spam messages: {nspam}")
    print(f"ham messages:  {nham}")
    print(f"tokens:        {len(toks)} ({only_spam} only in spam, {only_ham} only in ham)")
    print(f"trained:       {'yes' if d['trained'] else 'no (below [bayes] min_spam/min_ham)'}")
    if old:
        print(f"tokenizer:     OUTDATED: {db.bayes.tokens.outdated_note(old, nspam + nham)}")
    else:
        print(f"tokenizer:     token format {TOKEN_FORMAT} (current)")
    print(f"presence filter: {filt}")
    print(f"linear model:  {lin}")
    for key, label in (("top_spam", "spam"), ("top_ham", "ham")):
        if key in d:
            print(f"most frequent in {label}:")
            for t, s, h in d[key]:
                print(f"  {s:7d} spam {h:7d} ham  {t}")
    return 0
