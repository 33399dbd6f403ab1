"""Quarantine hold and digest throughput, with the reference measured in the same run.

hold: QuarantineService.hold (file write + fsync + directory fsync + index entries in the store)
      against the reference: the same bytes written to files with fsync + directory fsync and
      nothing else (the floor any durable quarantine must pay).
digest: rendering one digest of N entries (jinja2 sandbox, HTML + text, 4 signed links each).

    .venv/bin/python bench/quarantine_bench.py [--messages 300] [--store sqlite|redis]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(i: int) -> bytes:
    body = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 80) + GTUBE + "\r\n"
    return (f"From: s{i}@spam.example\r\nTo: bob@example.org\r\nSubject: offer {i}\r\n"
            f"Date: Fri, 27 Nov 2026 08:00:00 +0000\r\nMessage-ID: <{i}@spam.example>\r\n\r\n"
            + body).encode()


def reference(directory: Path, msgs: list[bytes]) -> float:
    t0 = time.perf_counter()
    for i, data in enumerate(msgs):
        tmp, path = directory / f".{i}.tmp", directory / f"{i}.eml"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    args = ap.parse_args()
    from filterd.pipeline import Pipeline
    from filterd.reports.digest import render_user_digest

    with tempfile.TemporaryDirectory() as tmp:
        ov = [f"server.state_dir={tmp}/state", "actions.reject=100000",
              "quarantine.secret=bench-secret-0123456789abcdef", "quarantine.enabled=true",
              "quarantine.base_url=https://quarantine.example.com",
              "quarantine.command_address=quarantine@gw.example"]
        prefix = f"filterd-bench-{uuid.uuid4().hex}:"
        if args.store == "redis":
            ov += ["store.backend=redis", f"store.prefix={prefix}"]
        pipe = await Pipeline.create(None, ov, use_default_path=False)
        service = pipe.services.extra["quarantine"]
        msgs = [message(i) for i in range(args.messages)]
        results = [await pipe.scan(m, "s@spam.example", ["bob@example.org"]) for m in msgs]
        t0 = time.perf_counter()
        for r in results:
            await service.hold(r.ctx, r, ["bob@example.org"])
        ours = time.perf_counter() - t0
        ref_dir = Path(tmp) / "ref"
        ref_dir.mkdir()
        ref = reference(ref_dir, msgs)
        n = args.messages
        print(f"hold ({args.store} index): {n / ours:8.1f} msg/s   reference fsync'd file "
              f"writes: {n / ref:8.1f} msg/s   ratio {ours / ref:.2f}x the reference's time")
        entries = await service.qstore.entries_for("bob@example.org")
        t0 = time.perf_counter()
        d = render_user_digest(service, "bob@example.org", entries, len(entries))
        dt = time.perf_counter() - t0
        print(f"digest of {len(entries)} entries: {dt * 1000:.1f} ms "
              f"({len(d.html) // 1024} KiB HTML, {len(d.text) // 1024} KiB text)")
        if args.store == "redis":
            for k in await pipe.services.store.keys(""):
                await pipe.services.store.delete(k)
        await pipe.close()


if __name__ == "__main__":
    asyncio.run(main())
