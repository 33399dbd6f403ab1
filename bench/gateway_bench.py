#!/usr/bin/env python3
"""Gateway benchmark: filterd against Postfix on the same machine, in one run.

    .venv/bin/python bench/gateway_bench.py                 # 5,000 x 5 KB over 20 sessions
    .venv/bin/python bench/gateway_bench.py --workers 2 --messages 10000

Measures, with Postfix's smtp-source as the load generator and smtp-sink as the final hop:

1. smtp-sink direct (the limit of the load generator and the loopback);
2. Postfix relay → smtp-sink (the anchor: a private Postfix instance, fsync as Postfix does);
3. filterd gateway (default plugins and rules, spool fsync on) → smtp-sink.

Throughput is end to end: from the first connection until every message has left the relay's
queue (Postfix: `postqueue -p` empty; filterd: spool empty). Latency p50/p99 is measured
separately with a Python client (20 sessions, time from MAIL FROM to the 250 after the data).
Finally, RSS of filterd (all processes) holding 5,000 idle sessions (after EHLO).
Nothing here asserts: it prints numbers and ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def smtp_source(port: int, n: int, sessions: int, size: int) -> float:
    t0 = time.monotonic()
    p = subprocess.run(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(n),
                        "-f", "a@example.com", "-t", "b@example.org", f"127.0.0.1:{port}"],
                       capture_output=True)
    if p.returncode != 0:
        print("smtp-source:", p.stderr.decode()[-500:], file=sys.stderr)
    return time.monotonic() - t0


def wait_until(pred, timeout: float = 600, step: float = 0.05) -> float:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return time.monotonic()
        time.sleep(step)
    raise SystemExit("timed out waiting for the queue to drain")


# -- latency client -----------------------------------------------------------------------------
async def _session(port: int, count: int, body: bytes, lat: list[float]) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)

    async def reply():
        while True:
            line = await r.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                return int(line[:3])

    await reply()
    w.write(b"EHLO bench.test\r\n")
    await reply()
    for _ in range(count):
        t0 = time.perf_counter()
        w.write(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        await reply(), await reply(), await reply()
        w.write(body + b".\r\n")
        code = await reply()
        lat.append(time.perf_counter() - t0)
        if code != 250:
            raise RuntimeError(f"reply {code}")
    w.write(b"QUIT\r\n")
    await reply()
    w.close()


def latency(port: int, n: int, sessions: int, size: int) -> tuple[float, float]:
    line = b"x" * 78 + b"\r\n"
    body = (b"From: a@example.com\r\nTo: b@example.org\r\nSubject: bench\r\n"
            b"Message-ID: <bench@example.com>\r\nDate: Fri, 27 Nov 2026 08:00:00 +0000\r\n\r\n"
            + line * max(1, size // len(line)))
    lat: list[float] = []

    async def main():
        await asyncio.gather(*(_session(port, n // sessions, body, lat) for _ in range(sessions)))
    asyncio.run(main())
    lat.sort()
    return statistics.median(lat) * 1000, lat[int(len(lat) * 0.99) - 1] * 1000


# -- peers ------------------------------------------------------------------------------------
class Postfix:
    def __init__(self, port: int, sink_port: int):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-pf-"))
        os.chmod(self.tmp, 0o755)
        self.conf, q = self.tmp / "pf", self.tmp / "q"
        self.conf.mkdir()
        q.mkdir()
        master = Path("/etc/postfix/master.cf")
        if not master.exists():
            master = Path("/usr/share/postfix/master.cf.dist")
        text = re.sub(r"(?m)^smtp(\s+)inet", f"127.0.0.1:{port}\\1inet", master.read_text())
        (self.conf / "master.cf").write_text(text)
        (self.conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {q}
data_directory = {q}/data
myhostname = bench.pf.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relayhost = [127.0.0.1]:{sink_port}
maillog_file = {self.tmp}/maillog
maillog_file_prefixes = {self.tmp}
smtputf8_enable = no
""")
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True)
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       capture_output=True)
        wait_port(port)

    def empty(self) -> bool:
        p = subprocess.run(["postqueue", "-c", str(self.conf), "-p"], capture_output=True)
        return b"Mail queue is empty" in p.stdout

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        # its processes exit on their own time: wait for them, so they do not run into the
        # next target's measurement
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(
                ["pgrep", "-f", str(self.conf)], capture_output=True).stdout.strip():
            time.sleep(0.2)
        shutil.rmtree(self.tmp, ignore_errors=True)


def settle() -> None:
    """Between targets: write back what the previous one left dirty (its queue files, the
    deleted ones' journal records) and let the machine go quiet, so no target pays for the
    previous one's disk work."""
    os.sync()
    time.sleep(2)


class Filterd:
    def __init__(self, port: int, sink_port: int, workers: int, extra=()):
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-filterd-"))
        self.spool = self.tmp / "spool"
        self.log = open(self.tmp / "serve.log", "wb")
        (self.tmp / "filterd.toml").write_text("# bench: the built-in defaults\n")
        cmd = [sys.executable, "-m", "filterd", "serve", "--log-level", "warning",
               "--config", str(self.tmp / "filterd.toml"),
               "--listen", f"127.0.0.1:{port}", "--relayhost", f"127.0.0.1:{sink_port}",
               "--spool", str(self.spool), "--workers", str(workers),
               "--set", f"server.state_dir={self.tmp}", "--set", "smtp.max_sessions=20000",
               "--set", "smtp.max_sessions_per_ip=20000", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))
        try:
            wait_port(port)
        except SystemExit:
            raise SystemExit("filterd did not start:\n" +
                             (self.tmp / "serve.log").read_text(errors="replace")[-2000:])
        time.sleep(0.5 + 0.3 * workers)

    def empty(self) -> bool:
        d = self.spool / "active"
        return not any(not p.name.endswith(".state") for p in d.iterdir()) if d.is_dir() \
            else True

    def pids(self) -> list[int]:
        out = [self.proc.pid]
        p = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        out += [int(x) for x in p.stdout.split()]
        return out

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += int(f[11]) + int(f[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def idle_sessions(port: int, n: int, fd: Filterd) -> tuple[float, float, int]:
    before = fd.rss_mb()
    socks = []
    ok = 0
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
        except OSError as exc:
            print(f"  connection {i}: {exc}", file=sys.stderr)
            break
    for s in socks:
        try:
            if s.recv(512).startswith(b"220"):
                s.sendall(b"EHLO idle.test\r\n")
        except OSError:
            pass
    for s in socks:
        try:
            data = b""
            while b"250 " not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            ok += b"250 " in data
        except OSError:
            pass
    time.sleep(1)
    after = fd.rss_mb()
    for s in socks:
        s.close()
    return before, after, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="filterd SMTP worker processes (default: one per CPU)")
    ap.add_argument("--latency-messages", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=5000, help="idle sessions for the RSS test")
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="extra filterd setting (repeatable), e.g. "
                    "--set 'plugins.disabled=[\"trace\"]' to see what a plugin costs")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.idle * 2 + 1000)), hard))
    for tool in ("smtp-source", "smtp-sink", "postfix"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: apt-get install postfix")
    n, s, size = args.messages, args.sessions, args.size
    print(f"# {n} messages of {size} bytes over {s} sessions; {os.cpu_count()} CPUs; "
          f"filterd workers={args.workers}" + "".join(f" --set {o}" for o in args.overrides))
    sink_port = free_port()
    sink_cmd = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + \
        [f"127.0.0.1:{sink_port}", "1000"]
    sink = subprocess.Popen(sink_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(sink_port)
    results: dict[str, tuple[float, float, float]] = {}
    try:
        t = smtp_source(sink_port, n, s, size)
        p50, p99 = latency(sink_port, args.latency_messages, s, size)
        results["smtp-sink direct"] = (n / t, p50, p99)
        accept: dict[str, float] = {}

        if not args.skip_postfix:
            settle()
            pf_port = free_port()
            pf = Postfix(pf_port, sink_port)
            try:
                t0 = time.monotonic()
                accept["Postfix relay -> sink"] = n / smtp_source(pf_port, n, s, size)
                t1 = wait_until(pf.empty, step=0.1)
                p50, p99 = latency(pf_port, args.latency_messages, s, size)
                wait_until(pf.empty, step=0.1)
                results["Postfix relay -> sink"] = (n / (t1 - t0), p50, p99)
            finally:
                pf.stop()

        settle()
        fport = free_port()
        extra = [x for o in args.overrides for x in ("--set", o)]
        fd = Filterd(fport, sink_port, args.workers, extra)
        try:
            t0 = time.monotonic()
            c0 = fd.cpu_seconds()
            accept["filterd gateway -> sink (fsync)"] = n / smtp_source(fport, n, s, size)
            t1 = wait_until(fd.empty)
            cpu_ms = (fd.cpu_seconds() - c0) * 1000 / n
            p50, p99 = latency(fport, args.latency_messages, s, size)
            wait_until(fd.empty)
            results["filterd gateway -> sink (fsync)"] = (n / (t1 - t0), p50, p99)
            rss_before, rss_after, ok = idle_sessions(fport, args.idle, fd)
        finally:
            fd.stop()
    finally:
        sink.terminate()
        sink.wait()

    print(f"{'target':<34} {'msg/s':>9} {'accept/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rate, p50, p99) in results.items():
        acc = f"{accept[name]:>9.0f}" if name in accept else f"{'':>9}"
        print(f"{name:<34} {rate:>9.0f} {acc} {p50:>8.2f} {p99:>8.2f}")
    print("(msg/s: end to end until the relay's queue is empty; accept/s: smtp-source alone)")
    print(f"filterd CPU per message (all processes, accept+scan+spool+deliver): {cpu_ms:.2f} ms")
    print(f"machine load average during the run: {os.getloadavg()[0]:.1f} "
          f"(other work on the machine distorts every figure)")
    f = results["filterd gateway -> sink (fsync)"][0]
    if "Postfix relay -> sink" in results:
        print(f"ratio filterd / Postfix relay: {f / results['Postfix relay -> sink'][0]:.2f}x "
              f"(target >= 1.0x)")
    print(f"ratio filterd / smtp-sink direct: {f / results['smtp-sink direct'][0]:.2f}x")
    print(f"idle sessions: {ok}/{args.idle} open after EHLO; filterd RSS {rss_before:.0f} MB "
          f"before, {rss_after:.0f} MB with them (target <= 300 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
