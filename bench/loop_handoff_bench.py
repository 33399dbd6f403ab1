#!/usr/bin/env python3
"""How much does handing a coroutine from a libmilter thread to the pipeline's event loop cost?

The milter runs libmilter's thread-per-connection callbacks; the pipeline is asyncio. This
measures, with T caller threads at once, the round trip of a trivial coroutine through:

  threadsafe   asyncio.run_coroutine_threadsafe(coro, loop).result()   (what filterd uses: one
               shared loop, so DNS/Redis/SQLite clients live on one loop)
  thread-loop  a private event loop per caller thread, run_until_complete  (faster, but every
               thread would need its own DNS/Redis/store clients: not what plugins expect)

Prints microseconds per call. filterd does one hand-off per message when no plugin implements
connect/helo/mail_from/rcpt_to hooks.
"""
from __future__ import annotations

import argparse
import asyncio
import threading
import time


async def work():
    return 1


def run_threadsafe(loop, n):
    for _ in range(n):
        asyncio.run_coroutine_threadsafe(work(), loop).result()


def run_thread_loop(_loop, n):
    own = asyncio.new_event_loop()
    for _ in range(n):
        own.run_until_complete(work())
    own.close()


def measure(fn, threads: int, n: int) -> float:
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    workers = [threading.Thread(target=fn, args=(loop, n)) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    dt = time.perf_counter() - t0
    loop.call_soon_threadsafe(loop.stop)
    t.join()
    return dt / (threads * n) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args()
    for threads in (1, 20, 60):
        a = measure(run_threadsafe, threads, args.calls // max(1, threads // 10))
        b = measure(run_thread_loop, threads, args.calls // max(1, threads // 10))
        print(f"threads={threads:<3} threadsafe {a:7.1f} us/call   thread-loop {b:7.1f} us/call")


if __name__ == "__main__":
    main()
