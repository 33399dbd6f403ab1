#!/usr/bin/env python3
"""Spool benchmark: durable enqueue throughput of filterd's group-commit spool against the
classic one-message-at-a-time durable write (Mailman's switchboard / maildir style: write temp,
fsync, rename, fsync directory), in one run, on the same file system.

    .venv/bin/python bench/spool_bench.py [--messages 3000] [--size 5120] [--concurrency 20]
                                          [--dir DIR]

Both sides fsync. The reference writes from `concurrency` asyncio tasks through a thread pool of
the same size (each task waits for its own write+fsync+rename+dir-fsync), which is how a server
without group commit behaves. Prints msg/s, p50/p99 enqueue latency and the ratio. Nothing here
asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filterd.queue import Envelope, Spool  # noqa: E402


async def run_spool(d: Path, n: int, data: bytes, conc: int) -> tuple[float, list[float]]:
    sp = Spool(d)
    lat: list[float] = []
    todo = iter(range(n))

    async def worker():
        for _ in todo:
            t = time.perf_counter()
            await sp.enqueue(Envelope("a@example.com", ["b@example.org"]), data)
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    el = time.perf_counter() - t0
    sp.close()
    return n / el, lat


async def run_reference(d: Path, n: int, data: bytes, conc: int) -> tuple[float, list[float]]:
    (d / "tmp").mkdir(parents=True)
    (d / "new").mkdir()
    pool = ThreadPoolExecutor(conc)
    lat: list[float] = []
    todo = iter(range(n))

    def write(i: int) -> None:
        tmp, dest = d / "tmp" / str(i), d / "new" / str(i)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, dest)
        dfd = os.open(d / "new", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)

    loop = asyncio.get_running_loop()

    async def worker():
        for i in todo:
            t = time.perf_counter()
            await loop.run_in_executor(pool, write, i)
            lat.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    el = time.perf_counter() - t0
    pool.shutdown()
    return n / el, lat


def pct(lat: list[float], p: float) -> float:
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--dir", default="", help="where to write (default: a temp dir under the "
                                              "current directory's file system)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=a.dir or "."))
    data = (b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n") * (a.size // 78 + 1)
    data = data[:a.size]
    try:
        ref, ref_lat = asyncio.run(run_reference(base / "ref", a.messages, data, a.concurrency))
        ours, our_lat = asyncio.run(run_spool(base / "spool", a.messages, data, a.concurrency))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"# {a.messages} messages of {a.size} bytes, {a.concurrency} concurrent writers, "
          f"fsync on, {os.cpu_count()} CPUs")
    print(f"{'target':<44}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}")
    print(f"{'reference: tmp+fsync+rename+dir fsync each':<44}{ref:>8.0f}"
          f"{pct(ref_lat, .5):>9.2f}{pct(ref_lat, .99):>9.2f}")
    print(f"{'filterd spool (group commit)':<44}{ours:>8.0f}"
          f"{pct(our_lat, .5):>9.2f}{pct(our_lat, .99):>9.2f}")
    print(f"ratio filterd / reference: {ours / ref:.2f}x")
    print(f"median enqueue latency: {statistics.median(our_lat) * 1000:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
