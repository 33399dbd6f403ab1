#!/usr/bin/env python3
"""Sender-authentication benchmark: filterd's DKIM verifier against opendkim, in one run.

    .venv/bin/python bench/auth_bench.py                 # 300 messages, RSA-2048 and ed25519
    .venv/bin/python bench/auth_bench.py --messages 1000

Signs N messages (about 5 KB each) with filterd's signer, then verifies them all:

1. filterd: ``filterd_plugins.dkim.verify_message`` (dkimpy, keys from the fixture resolver),
   one message after another in one process;
2. reference: ``opendkim -t file1,file2,...`` (the C library, keys from ``TestPublicKeys``),
   one process for the whole batch.

Both must report every signature as good (checked). Also times a full SPF evaluation (pyspf
through filterd's resolver double, include + a + mx mechanisms) per message; it has no
reference here. Nothing asserts: it prints numbers and ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from auth_fixtures import DATA, ed25519_public  # noqa: E402

from filterd.dns import FixtureResolver  # noqa: E402
from filterd_plugins.dkim import sign_message, verify_message  # noqa: E402
from filterd_plugins.spf import check_spf  # noqa: E402

HEADERS = ["from", "to", "subject", "date", "message-id"]


def make(i: int) -> bytes:
    body = "".join(f"Line {j} of message {i}: the quarterly numbers look fine.\r\n"
                   for j in range(80))
    return (f"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: Report {i}\r\n"
            f"Date: Fri, 27 Nov 2026 08:00:00 +0000\r\nMessage-ID: <m{i}@example.com>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}").encode()


def rsa_public() -> str:
    return (DATA / "dkim" / "2048_testkey_wo_markers.pub.txt").read_text().strip()


async def ours(messages: list[bytes], zones: dict) -> float:
    res = FixtureResolver(zones)
    t0 = time.perf_counter()
    for m in messages:
        r = await verify_message(res, m)
        assert [x.result for x in r] == ["pass"], r
    return time.perf_counter() - t0


def reference(messages: list[bytes], zones: dict, opendkim: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i, m in enumerate(messages):
            p = Path(d) / f"m{i}.eml"
            p.write_bytes(m)
            files.append(str(p))
        keys = Path(d) / "keys"
        keys.write_text("".join(f"{n} {z['TXT'][0]}\n" for n, z in zones.items()))
        conf = Path(d) / "opendkim.conf"
        conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\n")
        t0 = time.perf_counter()
        out = subprocess.run([opendkim, "-x", str(conf), "-t", ",".join(files), "-v"],
                             capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        good = (out.stdout + out.stderr).count("succeeded")
        assert good == len(messages), f"opendkim verified {good}/{len(messages)}"
        return elapsed


async def spf_bench(n: int) -> float:
    zones = {"example.com": {"TXT": ["v=spf1 include:_spf.example.com a mx -all"],
                             "A": ["198.51.100.1"], "MX": ["10 mx.example.com"]},
             "_spf.example.com": {"TXT": ["v=spf1 ip4:203.0.113.0/24 ~all"]},
             "mx.example.com": {"A": ["198.51.100.2"]}}
    res = FixtureResolver(zones)
    t0 = time.perf_counter()
    for _ in range(n):
        r = await check_spf(res, "192.0.2.7", "alice@example.com", "h.example")
        assert r.result == "fail"
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    args = ap.parse_args()
    opendkim = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not os.path.exists(opendkim):
        print("opendkim not installed (Debian package opendkim): no reference", file=sys.stderr)
        return 2
    n = args.messages
    print(f"DKIM verification of {n} signed messages (~5 KB each)")
    print(f"{'key':<14}{'filterd ms/msg':>16}{'opendkim ms/msg':>17}{'ratio':>8}")
    cases = [("rsa-2048", "rsa-sha256", (DATA / "dkim" / "2048_testkey.key").read_bytes(),
              rsa_public()),
             ("ed25519", "ed25519-sha256",
              (DATA / "dkim" / "ed25519test.key").read_bytes().strip(),
              f"v=DKIM1; k=ed25519; p={ed25519_public('ed25519test.key')}")]
    for label, alg, key, pub in cases:
        zones = {"bench._domainkey.example.com": {"TXT": [pub]}}
        signed = []
        for i in range(n):
            m = make(i)
            v = sign_message(m, "example.com", "bench", key, alg, "relaxed/relaxed", HEADERS,
                             ["from"])
            signed.append(b"DKIM-Signature: " + v.encode() + b"\r\n" + m)
        t_ours = asyncio.run(ours(signed, zones))
        t_ref = reference(signed, zones, opendkim)
        print(f"{label:<14}{t_ours / n * 1000:>16.2f}{t_ref / n * 1000:>17.2f}"
              f"{t_ours / t_ref:>8.2f}")
    t_spf = asyncio.run(spf_bench(n))
    print(f"SPF (include+a+mx, fixture DNS): {t_spf / n * 1000:.2f} ms/check (no reference)")
    print("ratio = filterd time / opendkim time (lower is better; opendkim's includes one "
          "process start-up for the whole batch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
