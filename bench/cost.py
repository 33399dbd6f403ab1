#!/usr/bin/env python3
"""Instructions per message, counted by valgrind (callgrind): a cost that does not move with
the machine's load, so a change worth 3 % shows, where msg/s on a shared 2-CPU machine moves
by 10-20 % between two runs of the same code. Not a test: nothing here asserts a figure.

    python bench/cost.py milter [--messages 200]
        filterd's milter (default plugins and rules) and, in the same run, a milter that does
        nothing but take headers and body on the same asyncio protocol code (the floor of that
        engine), both driven by a Postfix-like client: 20 connections at a time, one 5 KB
        message each, the commands, macros and headers Postfix sends.
    python bench/cost.py milter --each-plugin [--jobs 2]
        the same, then filterd once more per enabled plugin with that plugin disabled: what
        each plugin costs a message (a cost several plugins share, such as parsing the MIME
        body, shows under none of them: the next plugin that needs it pays it).
    python bench/cost.py bayes [CORPUS] [--messages 200] [--split date|random]
        filterd's Bayes classification and bogofilter's (Debian package) on the same test
        messages, both trained on the same training part (bench/bayes_bench.py's split).

Each process is counted twice, serving W warm-up messages and then 0 or N more; the
difference divided by N is the cost of one message, start-up and warm-up excluded. Only
user-space instructions count: system calls and the kernel's work are not in the figure.
Classification counts are exact from run to run; a milter's vary by a few per cent (how many
packets one read brings depends on scheduling), hence ``--rounds``.

Instructions are a proxy for time, not time: interpreted Python does fewer instructions per
cycle than a C program, so a ratio of instructions flatters Python (on 2026-11-27:
filterd/bogofilter 0.56x in instructions, 0.45x in CPU seconds, on the same split). Use this
to see what a change costs; use bench/milter_bench.py and bench/bayes_bench.py for the targets.
Needs valgrind (Debian package), and for ``bayes`` bogofilter.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from milter_support import free_port  # noqa: E402

from filterd.milter import protocol as P  # noqa: E402

VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(stderr: str, what: str) -> int:
    m = _COLLECTED.search(stderr)
    if not m:
        raise RuntimeError(f"{what}: valgrind printed no instruction count:\n{stderr[-2000:]}")
    return int(m.group(1))


# -- a Postfix-like milter client -----------------------------------------------------------------
RECEIVED = ("from localhost (localhost [127.0.0.1])\n\tby mx.example (Postfix) with "
            "ESMTP id 4Nbench{n:06d}\n\tfor <rcpt@example.org>; Fri, 27 Nov 2026 22:00:00 +0000 "
            "(UTC)")
HEADERS = [("From", "<bench@example.com>"), ("To", "<rcpt@example.org>"),
           ("Date", "Fri, 27 Nov 2026 22:00:00 +0000 (UTC)"),
           ("Message-Id", "<20261127220000.{n:06d}@mx.example>")]
BODY = b"".join(b"La de da de da %4d.\r\n" % i for i in range(5120 // 22))


def _pk(cmd: bytes, data: bytes = b"") -> bytes:
    return P.packet(cmd, data)


def _macros(stage: bytes, values: dict[str, str]) -> bytes:
    return _pk(P.C_MACRO, stage + b"".join(k.encode() + b"\0" + v.encode() + b"\0"
                                           for k, v in values.items()))


async def _read(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    n = struct.unpack(">I", await r.readexactly(4))[0]
    d = await r.readexactly(n)
    return d[:1], d[1:]


async def _session(port: int, n: int) -> bytes:
    """One connection, one message, as Postfix's smtpd sends it: the steps the milter asked to
    skip are not sent, the ones it asked not to answer are not waited for."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(_pk(P.C_OPTNEG, struct.pack(">III", 6, 0x1FF, 0x1FFFFF)))
    _, data = await _read(r)
    prot = struct.unpack(">III", data[:12])[2]

    async def step(cmd: bytes, data: bytes, skip: int, noreply: int, macros: bytes = b""):
        w.write(macros)
        if prot & skip:
            return
        w.write(_pk(cmd, data))
        if not prot & noreply:
            while (await _read(r))[0] == P.R_PROGRESS:
                pass

    await step(P.C_CONNECT, b"localhost\x004" + struct.pack(">H", 10000 + n % 50000)
               + b"127.0.0.1\0", P.P_NOCONNECT, P.P_NR_CONN,
               _macros(P.C_CONNECT, {"j": "mx.example", "{daemon_name}": "smtpd",
                                     "v": "Postfix 3.7.11"}))
    await step(P.C_HELO, b"localhost\0", P.P_NOHELO, P.P_NR_HELO)
    await step(P.C_MAIL, b"<bench@example.com>\0", P.P_NOMAIL, P.P_NR_MAIL,
               _macros(P.C_MAIL, {"i": f"4Nbench{n:06d}", "{mail_addr}": "bench@example.com"}))
    await step(P.C_RCPT, b"<rcpt@example.org>\0", P.P_NORCPT, P.P_NR_RCPT,
               _macros(P.C_RCPT, {"{rcpt_addr}": "rcpt@example.org"}))
    await step(P.C_DATA, b"", P.P_NODATA, P.P_NR_DATA)
    for name, value in [("Received", RECEIVED)] + HEADERS:
        await step(P.C_HEADER, name.encode() + b"\0 " + value.format(n=n).encode() + b"\0",
                   P.P_NOHDRS, P.P_NR_HDR)
    await step(P.C_EOH, b"", P.P_NOEOH, P.P_NR_EOH)
    await step(P.C_BODY, BODY, P.P_NOBODY, P.P_NR_BODY)
    w.write(_pk(P.C_BODYEOB))
    final = (P.R_ACCEPT, P.R_CONTINUE, P.R_REJECT, P.R_TEMPFAIL, P.R_DISCARD, P.R_REPLYCODE)
    while (cmd := (await _read(r))[0]) not in final:
        pass
    w.write(_pk(P.C_QUIT))
    w.close()
    return cmd


async def drive(port: int, messages: int, start: int = 0, sessions: int = 20) -> dict:
    sem = asyncio.Semaphore(sessions)
    replies: dict[str, int] = {}

    async def one(n: int) -> None:
        async with sem:
            cmd = await _session(port, n)
            replies[cmd.decode()] = replies.get(cmd.decode(), 0) + 1

    await asyncio.gather(*(one(start + i) for i in range(messages)))
    return replies


def count_server(cmd: list[str], port: int, warm: int, messages: int, what: str) -> int:
    """Instructions of the milter ``cmd`` (listening on ``port``) serving warm + messages."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(VALGRIND + cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # a Python start-up under valgrind is slow
            while True:
                try:
                    asyncio.run(drive(port, 1))
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        err.seek(0)
                        raise RuntimeError(f"{what} did not start:\n"
                                           f"{err.read().decode(errors='replace')[-3000:]}")
                    time.sleep(1)
            replies = asyncio.run(drive(port, warm + messages, start=1))
            proc.send_signal(signal.SIGTERM)
            proc.wait(300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        text = err.read().decode(errors="replace")
    print(f"    {what}: {warm + messages + 1} messages, replies {replies}", file=sys.stderr)
    return instructions(text, what)


def per_message(cmd_for_port, warm: int, messages: int, what: str, rounds: int = 1) -> float:
    """Median over ``rounds`` of (instructions serving warm + messages, minus serving warm) /
    messages. A server's count is not exact: how many packets one read brings and how often
    its timers fire depend on scheduling (two runs of the same code differ by up to ~7 %; run
    alone, with --rounds 3, when comparing small changes)."""
    out = []
    for _ in range(rounds):
        base = count_server(*cmd_for_port(), warm, 0, what)
        full = count_server(*cmd_for_port(), warm, messages, what)
        out.append((full - base) / messages)
    return statistics.median(out)


def milter(args) -> int:
    from milter_bench import NATIVE_NULL_MILTER, Dnsmasq

    dns = Dnsmasq() if shutil.which("dnsmasq") else None  # the stub milter_bench.py uses
    if dns is None:
        print("note: dnsmasq not installed (apt-get install dnsmasq-base): filterd's DNS "
              "queries go to the system resolver", file=sys.stderr)
    state = Path(tempfile.mkdtemp(prefix="filterd-cost-"))
    (state / "empty.toml").write_text("")

    base_sets = [x for s in args.set for x in ("--set", s)]

    def filterd_cmd(extra=()):
        port = free_port()
        st = tempfile.mkdtemp(dir=state)
        return ([sys.executable, "-m", "filterd", "milter", "--log-level", "warning",
                 "--listen", f"inet:{port}@127.0.0.1", "--workers", "1",
                 "--set", f"server.state_dir={st}", "--config", str(state / "empty.toml")]
                + (["--set", f'dns.nameservers=["127.0.0.1:{dns.port}"]'] if dns else [])
                + base_sets + list(extra), port)

    def null_cmd():
        port = free_port()
        return [sys.executable, "-c", NATIVE_NULL_MILTER, str(port), "1", "content"], port

    print(f"milter cost: {args.messages} messages of {len(BODY)} bytes body after "
          f"{args.warm} warm-up, 20 connections at a time (valgrind: slow)", file=sys.stderr)
    without: dict[str, float] = {}
    try:
        null = per_message(null_cmd, args.warm, args.messages, "null native milter", args.rounds)
        fd = per_message(filterd_cmd, args.warm, args.messages, "filterd milter", args.rounds)
        if args.each_plugin:
            names = enabled_plugins(state / "empty.toml", base_sets)

            def count_without(name: str) -> tuple[str, float]:
                extra = ("--set", f'plugins.disabled=["{name}"]')
                return name, per_message(lambda: filterd_cmd(extra), args.warm, args.messages,
                                         f"filterd milter without {name}", args.rounds)

            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                without = dict(pool.map(count_without, names))
    finally:
        if dns:
            dns.stop()
        shutil.rmtree(state, ignore_errors=True)
    print(f"  null native milter (hdr+body)     {null / 1e6:7.2f} M instructions/msg")
    print(f"  filterd milter (default plugins)  {fd / 1e6:7.2f} M instructions/msg  "
          f"({fd / null:.1f}x the floor; {(fd - null) / 1e6:.2f} M of filterd's own work)")
    if without:
        own = fd - null
        print("  each plugin's cost (filterd with it disabled; a count varies by a few per cent "
              "between runs: use --rounds 3 to compare small figures)")
        for name, cost in sorted(without.items(), key=lambda kv: kv[1]):
            print(f"    {name:16} {cost / 1e6:6.2f} M without it: {(fd - cost) / 1e6:+6.2f} M "
                  f"({(fd - cost) / own * 100:+5.1f} % of filterd's own work)")
    return 0


def enabled_plugins(config: Path, sets: list[str]) -> list[str]:
    """The plugins ``filterd plugins`` lists as enabled with this config (names, in order)."""
    p = subprocess.run([sys.executable, "-m", "filterd", "plugins", "--json", "--config",
                        str(config), *sets], capture_output=True, text=True, cwd=ROOT,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(f"filterd plugins --json failed ({p.returncode}): {p.stderr[-2000:]}")
    return [x["name"] for x in json.loads(p.stdout) if x["state"] == "enabled"]


# -- Bayes ----------------------------------------------------------------------------------------
FILTERD_CLASSIFY = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from filterd.bayes import Bayes
from filterd.store.sqlite import SQLiteStore
async def main():
    store = SQLiteStore(sys.argv[2])
    bayes = Bayes(store)
    for name in open(sys.argv[3]).read().split("\\n"):
        if name:
            with open(name, "rb") as f:
                await bayes.classify(f.read())
    await store.close()
asyncio.run(main())
"""


def bayes(args) -> int:
    import bayes_bench as bb

    from filterd.bayes import Bayes
    from filterd.store.sqlite import SQLiteStore

    if not shutil.which("bogofilter"):
        print("bogofilter is not installed (apt-get install bogofilter)", file=sys.stderr)
        return 2
    corpus = Path(args.corpus)
    ham, spam = bb.load_corpus(corpus)
    if not ham or not spam:
        print(f"corpus {corpus}: need sub-directories named *ham* and *spam*", file=sys.stderr)
        return 2
    split = argparse.Namespace(seed=1, folds=0, split=args.split, test_fraction=0.3)
    trh, trs, teh, tes = next(bb.splits(ham, spam, split))
    test = teh + tes
    step = max(1, len(test) // (args.messages + 1))
    picked = [str(p) for p in test[::step][:args.messages + 1]]
    with tempfile.TemporaryDirectory(prefix="bayes-cost-") as tmp:
        tmp = Path(tmp)
        db = tmp / "filterd.sqlite"

        async def train():
            store = SQLiteStore(db)
            b = Bayes(store)
            await b.learn((p.read_bytes() for p in trs), spam=True)
            await b.learn((p.read_bytes() for p in trh), spam=False)
            await store.close()

        asyncio.run(train())
        bogo = tmp / "bogo"
        bogo.mkdir()
        bb.bogofilter_bulk(bogo, ["-s"], trs)
        bb.bogofilter_bulk(bogo, ["-n"], trh)
        lists = {}
        for k, names in (("one", picked[:1]), ("all", picked)):
            lists[k] = tmp / f"{k}.txt"
            lists[k].write_text("\n".join(names) + "\n")

        def run(cmd, what):
            p = subprocess.run(VALGRIND + cmd, capture_output=True, text=True, cwd=ROOT, check=False)
            return instructions(p.stderr, what)

        n = len(picked) - 1
        print(f"bayes cost: {args.split} split, trained on {len(trh)} ham + {len(trs)} spam; "
              f"{n} test messages (valgrind: slow)", file=sys.stderr)
        fd = (run([sys.executable, "-c", FILTERD_CLASSIFY, str(ROOT), str(db), str(lists["all"])],
                  "filterd")
              - run([sys.executable, "-c", FILTERD_CLASSIFY, str(ROOT), str(db),
                     str(lists["one"])], "filterd")) / n
        bf = (run(["bogofilter", "-d", str(bogo), "-T", "-B", *picked], "bogofilter")
              - run(["bogofilter", "-d", str(bogo), "-T", "-B", *picked[:1]], "bogofilter")) / n
    print(f"  bogofilter classify  {bf / 1e6:6.2f} M instructions/msg")
    print(f"  filterd classify     {fd / 1e6:6.2f} M instructions/msg")
    print(f"  ratio filterd/bogofilter (speed, by instructions): {bf / fd:.2f}x")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("milter", help="filterd's milter beside a null milter")
    m.add_argument("--messages", type=int, default=200)
    m.add_argument("--warm", type=int, default=20)
    m.add_argument("--rounds", type=int, default=1, help="count each this many times, median")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for filterd (what a setting costs)")
    m.add_argument("--each-plugin", action="store_true",
                   help="also count filterd once per enabled plugin with it disabled")
    m.add_argument("--jobs", type=int, default=1,
                   help="counts run at once for --each-plugin (valgrind uses one CPU each)")
    b = sub.add_parser("bayes", help="filterd's Bayes classification beside bogofilter's")
    b.add_argument("corpus", nargs="?", default=None)
    b.add_argument("--messages", type=int, default=200)
    b.add_argument("--split", choices=("date", "random"), default="date")
    args = ap.parse_args(argv)
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.what == "milter":
        return milter(args)
    if args.corpus is None:
        import bayes_bench

        args.corpus = str(bayes_bench.DEFAULT_CORPUS)
    return bayes(args)


if __name__ == "__main__":
    sys.exit(main())
