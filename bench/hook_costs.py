#!/usr/bin/env python3
"""What each plugin hook costs a message, measured inside one process: filterd's pipeline
driven directly (no milter, no Postfix) with the message and envelope `cost.py milter` uses,
every hook call timed. Not a test: nothing here asserts a figure.

    python bench/hook_costs.py [--messages 3000] [--set KEY=VALUE ...]

Prints the pipeline's CPU time per message (MAIL FROM, RCPT TO and the content scan, the way
the milter runs them) and, per plugin hook, the time of one call, largest first. A hook's time
includes everything it touches first for the message (the first plugin to read the parsed
message pays the parse), so the figures are what disabling one plugin would save only roughly.
DNS goes to a dnsmasq stub on loopback when dnsmasq is installed (as in milter_bench.py).

Unlike `cost.py` (instructions under valgrind) these are times: they move with the machine's
load by 10-20 %, but they include what instructions do not show, such as a call into a big
library (SQLite, the email package, Hyperscan) that runs slower when the code before it has
pushed its code and data out of the CPU caches. Run it on an idle machine, twice.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from cost import BODY, HEADERS, RECEIVED  # noqa: E402

from filterd.model import Message, Session  # noqa: E402
from filterd.pipeline import Pipeline  # noqa: E402


def bench_message(n: int) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The message `cost.py milter` sends, and its header fields as the milter hands them on."""
    hdrs = [("Received", RECEIVED.format(n=n))] + [(k, v.format(n=n)) for k, v in HEADERS]
    fields = [(k.encode(), (" " + v.replace("\n", "\r\n")).encode()) for k, v in hdrs]
    return b"".join(k + b":" + v + b"\r\n" for k, v in fields) + b"\r\n" + BODY, fields


class HookTimer:
    """Wraps a PluginHost's start_one (on the instance) and sums each hook's time."""

    def __init__(self, host):
        self.ns: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self.waited: set = set()
        start_one = host.start_one
        clock = time.perf_counter_ns

        def timed(impl, kwargs, ctx=None):
            key = (impl.plugin_name, impl.function.__name__)
            t0 = clock()
            done = start_one(impl, kwargs, ctx)
            if done.__class__ is tuple:
                self.ns[key] += clock() - t0
                self.calls[key] += 1
                return done
            self.waited.add(key)

            async def finish():
                try:
                    return await done
                finally:
                    self.ns[key] += clock() - t0  # (includes the wait)
                    self.calls[key] += 1
            return finish()

        host.start_one = timed

    def reset(self) -> None:
        self.ns.clear()
        self.calls.clear()
        self.waited.clear()


async def run(args) -> int:
    from milter_bench import Dnsmasq

    dns = Dnsmasq() if shutil.which("dnsmasq") else None
    if dns is None:
        print("note: dnsmasq not installed (apt-get install dnsmasq-base): DNS queries go to "
              "the system resolver", file=sys.stderr)
    state = Path(tempfile.mkdtemp(prefix="filterd-hooks-"))
    (state / "empty.toml").write_text("")
    overrides = [f"server.state_dir={state}"] + (
        [f'dns.nameservers=["127.0.0.1:{dns.port}"]'] if dns else []) + args.set
    pipeline = await Pipeline.create(str(state / "empty.toml"), overrides)
    timer = HookTimer(pipeline.host)
    try:
        async def one(n: int):
            raw, fields = bench_message(n)
            ctx = pipeline.begin(Session(peer_ip="127.0.0.1", peer_name="localhost",
                                         helo="localhost", front_door="milter"))
            await pipeline.mail_from(ctx, "bench@example.com")
            await pipeline.rcpt_to(ctx, "rcpt@example.org")
            return await pipeline.data(ctx, Message(raw, fields))

        for i in range(args.warm):
            result = await one(i)
        timer.reset()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(args.messages):
            await one(args.warm + i)
        cpu = (time.process_time() - cpu0) / args.messages
        wall = (time.perf_counter() - wall0) / args.messages
    finally:
        await pipeline.close()
        if dns:
            dns.stop()
        shutil.rmtree(state, ignore_errors=True)

    n = args.messages
    total = sum(timer.ns.values()) / n / 1000
    print(f"pipeline: {n} messages of {len(BODY)} bytes body; outcome {result.action.value}, "
          f"symbols {', '.join(s.name for s in result.symbols) or 'none'}")
    print(f"  CPU {cpu * 1e6:7.1f} us/msg (wall {wall * 1e6:.1f}); in plugin hooks "
          f"{total:.1f} us/msg")
    for (plugin, hook), ns in timer.ns.most_common():
        calls = timer.calls[(plugin, hook)]
        print(f"  {ns / max(calls, 1) / 1000:7.1f} us/call  {calls / n:4.1f}/msg  "
              f"{plugin}.{hook}" + ("  (waited)" if (plugin, hook) in timer.waited else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--warm", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override, as filterd's --set (repeatable)")
    return asyncio.run(run(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
