#!/usr/bin/env python3
"""Milter throughput: smtp-source -> private Postfix -> smtp-sink, in ONE run:

  1. Postfix alone (no milter)
  2. Postfix + rspamd's milter (Debian rspamd, default config, DNS on a local dnsmasq stub)
  3. Postfix + `filterd milter` (default plugins and rules; same DNS stub), per worker count

for each session count (default 20 and 60), 5 KB messages. Prints msg/s (messages accepted by
Postfix per second of smtp-source wall time) and the ratio filterd/rspamd. Not a test: nothing
here asserts a time. Needs root (rspamd, dnsmasq, smtp-sink -u nobody).

    .venv/bin/python bench/milter_bench.py                      # defaults
    .venv/bin/python bench/milter_bench.py --messages 5000 --workers 1,2,4 --sessions 20,60
    .venv/bin/python bench/milter_bench.py --rounds 3           # median of 3 turns each
    .venv/bin/python bench/milter_bench.py --pymilter-floor   # + a null pymilter milter
    .venv/bin/python bench/milter_bench.py --pymilter-floor --floor-workers 1,2 --floor-content
        # the null milter in 1 and 2 processes, also taking headers and body as filterd must
    .venv/bin/python bench/milter_bench.py --python debian --native-floor --floor-cpu 300,600
        # + the null asyncio milter spending 300 and 600 us of Python per message: how much
        # CPU per message a milter can afford for a given ratio to rspamd on this machine
    .venv/bin/python bench/milter_bench.py --python debian --native-floor --cpu-by-process
        # + each run's CPU per message by process (Postfix's daemons, the milter, the sink)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from gateway_bench import settle  # noqa: E402
from milter_support import FilterdMilterProc, Postfix, Sink, free_port, wait_port  # noqa: E402

RSPAMD_OPTIONS = Path("/etc/rspamd/local.d/options.inc")


def smtp_source(port: int, sessions: int, messages: int, size: int) -> float:
    cmd = ["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(messages),
           "-f", "bench@example.com", "-t", "rcpt@example.org", f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, timeout=3600)
    dt = time.monotonic() - t0
    if r.returncode != 0:
        print(f"  smtp-source exited {r.returncode}: {r.stderr.decode(errors='replace')[-500:]}")
    return dt


def count_accepted(pf: Postfix, before: int) -> tuple[int, int]:
    """(queued by Postfix, refused by a milter) since the log had ``before`` lines."""
    lines = pf.log().splitlines()[before:]
    queued = sum(1 for ln in lines if "postfix/qmgr" in ln and "(queue active)" in ln)
    refused = sum(1 for ln in lines if "milter-reject" in ln or "milter-discard" in ln)
    return queued, refused


def wait_drained(pf: Postfix, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not pf.queue_empty():
        time.sleep(0.2)


NULL_MILTER = """
import os, sys
import Milter, milter

port, workers, content = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "content"
sys.setswitchinterval(0.0005)  # as filterd's [server] switch_interval


class Null(Milter.Base):
    def eom(self):
        self.addheader("X-Null", "1")
        return Milter.CONTINUE


class Content(Null):
    # takes the headers and body (no reply to each, as filterd negotiates), as any milter that
    # reads the message must
    @Milter.noreply
    def header(self, name, value):
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        return Milter.CONTINUE


from filterd.milter.libmilter import set_nodelay

_open, _main = milter.opensocket, milter.main


def opensocket(rm):  # TCP_NODELAY on the listener, as filterd sets it
    r = _open(rm)
    set_nodelay(f"inet:{port}@127.0.0.1")
    return r


def main():  # several processes on one listening socket, as filterd's [milter] workers
    opensocket(True)
    for _ in range(workers - 1):
        if os.fork() == 0:
            break
    return _main()


milter.opensocket, milter.main = opensocket, main
Milter.factory = Content if content else Null
Milter.set_flags(Milter.ADDHDRS)
Milter.runmilter("null", f"inet:{port}@127.0.0.1", 60)
"""


NATIVE_NULL_MILTER = """
import asyncio, os, sys
from filterd.milter import protocol as P
from filterd.milter.native import listen_socket
from filterd.milter.server import MilterSettings

port, workers = int(sys.argv[1]), int(sys.argv[2])
# optional: microseconds of plain Python work (CPU, no system calls) at each end of message
WORK_US = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0


def _spin(n):
    x = 0
    for i in range(n):
        x += i
    return x


def _calibrate():  # loop turns per microsecond of this process's CPU time, measured once
    import time
    n, t0 = 200_000, time.process_time()
    _spin(n)
    return n / max((time.process_time() - t0) * 1e6, 1.0)


SPINS = int(WORK_US * _calibrate()) if WORK_US > 0 else 0
NR = P.P_NR_CONN | P.P_NR_HELO | P.P_NR_MAIL | P.P_NR_RCPT | P.P_NR_HDR | P.P_NR_BODY
WANT = NR | P.P_NOEOH | P.P_NODATA | P.P_NOUNKNOWN | P.P_HDR_LEADSPC
EOM = (P.header_packet(P.R_INSHEADER, "X-Null", " 1", 0) + P.packet(P.R_CONTINUE))


class Null(P.MilterConnection):
    # takes the headers and body without replying (as filterd negotiates) and adds one header;
    # ACKs what it does not answer at once, as filterd's native engine (protocol.MilterConnection)
    def on_optneg(self, data):
        self.headers, self.chunks = [], []
        v, actions, proto = P.OPTNEG.unpack_from(data)
        self.send(P.optneg_reply(actions & P.F_ADDHDRS, proto & WANT))

    def on_connect(self, data):
        pass

    on_helo = on_mail = on_rcpt = on_connect

    def on_header(self, data):
        self.headers.append(data)

    def on_body(self, data):
        self.chunks.append(data)

    def on_eom(self, data):
        self.headers, self.chunks = [], []
        if SPINS:
            _spin(SPINS)
        self.send(EOM)


# the listening socket as filterd's native engine opens it (TCP_NODELAY included)
sock = listen_socket(MilterSettings(listen=f"inet:{port}@127.0.0.1"))
for _ in range(workers - 1):
    if os.fork() == 0:
        break


async def main():
    await asyncio.get_running_loop().create_server(Null, sock=sock)
    await asyncio.Event().wait()

asyncio.run(main())
"""

class NullMilter:
    """The floor of any pymilter milter: one that only adds a header (TCP_NODELAY and
    filterd's switch interval set), in ``workers`` processes; ``content``: it also takes the
    headers and body callbacks, as a milter that looks at the message must."""

    def __init__(self, workers: int = 1, content: bool = False, native: bool = False,
                 work_us: float = 0.0, python: str | None = None):
        self.port = free_port()
        self.proc = subprocess.Popen([python or sys.executable, "-c",
                                      NATIVE_NULL_MILTER if native else NULL_MILTER,
                                      str(self.port), str(workers),
                                      "content" if content else "eom"]
                                     + ([str(work_us)] if work_us else []),
                                     start_new_session=True, cwd=ROOT)
        wait_port(self.port, 10)
        self.spec = f"inet:127.0.0.1:{self.port}"

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the forked workers too
        except ProcessLookupError:
            pass
        self.proc.wait(5)


def proc_stats() -> dict[int, tuple[str, list[str]]]:
    """Every live process: pid -> (its command name, the fields of /proc/PID/stat after the
    name: [0] state, [1] ppid, [11] utime, [12] stime, [19] start time)."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                s = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = (s[s.find("(") + 1:s.rfind(")")], s.rsplit(")", 1)[1].split())
    return out


def tree_cpu(pid: int | None) -> tuple[float, float]:
    """CPU seconds (user, system) used so far by process ``pid`` and its live descendants
    (the milter and its forked workers); zeros without a pid."""
    if not pid:
        return 0.0, 0.0
    stats = {p: (int(f[1]), int(f[11]), int(f[12]))  # ppid, utime, stime
             for p, (_, f) in proc_stats().items()}
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        _, u, s = stats.get(p, (0, 0, 0))
        user, system = user + u, system + s
        todo += [c for c, (pp, _, _) in stats.items() if pp == p]
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def process_cpu() -> dict[tuple[int, str], tuple[str, int]]:
    """CPU ticks (user + system) of every live process, keyed by (pid, start time), with the
    name it is counted under: the command name, or the script for a Python process."""
    out = {}
    for pid, (name, f) in proc_stats().items():
        if name.startswith("python"):
            try:
                argv = [a.decode(errors="replace")
                        for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            except OSError:
                continue
            if len(argv) > 2 and argv[1] == "-c":  # the null milters: python -c CODE
                argv[2] = "..."
            name = "python " + " ".join(argv[1:4])[:40]
        out[(pid, f[19])] = (name, int(f[11]) + int(f[12]))
    return out


def cpu_by_process(before: dict, after: dict, messages: int) -> str:
    """The processes that used CPU between two :func:`process_cpu` snapshots, grouped by name,
    in ms per message (processes that ended in between are missed: smtp-source's own)."""
    use: dict[str, float] = {}
    for key, (name, ticks) in after.items():
        spent = ticks - before.get(key, (name, 0))[1]
        if spent > 0:
            use[name] = use.get(name, 0) + spent
    ms = 1000 / os.sysconf("SC_CLK_TCK") / messages
    top = sorted(use.items(), key=lambda kv: -kv[1])[:10]
    return ", ".join(f"{name} {ticks * ms:.2f}" for name, ticks in top)


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, from /proc/stat. Busy leaves out
    ``nice`` time: work at a lower priority (another job on the machine) is not the mail
    path's."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, _nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + system + irq + softirq + steal) / tick, (idle + iowait) / tick


def measure(label: str, sink: Sink, milter_spec: str | None, args,
            milter_pid: int | None = None) -> dict:
    settle()
    pf = Postfix(sink.port, milter=milter_spec)
    out = {}
    try:
        # warm-up: a few messages so process pools and caches exist
        smtp_source(pf.port, 5, 50, args.size)
        wait_drained(pf)
        for s in args.sessions:
            before = len(pf.log().splitlines())
            procs0 = process_cpu() if args.cpu_by_process else None
            cpu0, m0 = tree_cpu(milter_pid), machine_cpu()
            dt = smtp_source(pf.port, s, args.messages, args.size)
            cpu1, m1 = tree_cpu(milter_pid), machine_cpu()
            procs1 = process_cpu() if args.cpu_by_process else None
            busy, idle = m1[0] - m0[0], m1[1] - m0[1]
            user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            cpu = user + system
            time.sleep(0.5)
            queued, refused = count_accepted(pf, before)
            rate = args.messages / dt
            out[s] = rate
            mcpu = (f", milter CPU {cpu / args.messages * 1000:.2f} ms/msg: user "
                    f"{user / args.messages * 1000:.2f}, system "
                    f"{system / args.messages * 1000:.2f}" if milter_pid else "")
            print(f"  {label:<34} sessions={s:<3} {args.messages} msgs in {dt:6.2f}s "
                  f"= {rate:7.1f} msg/s  (queued {queued}, milter-refused {refused}{mcpu}; "
                  f"machine CPU {busy / args.messages * 1000:.2f} ms/msg, "
                  f"{100 * idle / max(busy + idle, 1e-9):.0f} % idle)",
                  flush=True)
            if procs0 is not None:
                print(f"    CPU ms/msg by process: {cpu_by_process(procs0, procs1, args.messages)}",
                      flush=True)
            wait_drained(pf)
    finally:
        pf.stop()
    return out


class Dnsmasq:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
             f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
             "--address=/#/", "--user=nobody"], stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


class Rspamd:
    """Debian's rspamd with its default config, DNS pointed at the stub."""

    def __init__(self, dns_port: int):
        self.saved = RSPAMD_OPTIONS.read_bytes() if RSPAMD_OPTIONS.exists() else None
        RSPAMD_OPTIONS.write_text(f'dns {{ nameserver = ["127.0.0.1:{dns_port}"]; }}\n')
        Path("/run/rspamd").mkdir(exist_ok=True)
        shutil.chown("/run/rspamd", "_rspamd")
        self.pidfile = Path("/run/rspamd/rspamd.pid")
        for port in (11332, 11333):
            try:
                wait_port(port, 0.2)
            except RuntimeError:
                continue
            raise RuntimeError(f"something already listens on 127.0.0.1:{port}; stop the "
                               "running rspamd first so the benchmark measures its own")
        log = Path("/var/log/rspamd/rspamd.log")
        start = log.stat().st_size if log.exists() else 0
        # rspamd daemonizes: no pipes, or run() would wait for its workers
        r = subprocess.run(["rspamd", "-u", "_rspamd", "-g", "_rspamd"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"rspamd failed to start (exit {r.returncode}); "
                               "see /var/log/rspamd/rspamd.log")
        wait_port(11332, 60)
        wait_port(11333, 60)
        self.wait_hyperscan(log, start)
        time.sleep(1)

    @staticmethod
    def wait_hyperscan(log: Path, start: int, timeout: float = 180) -> None:
        """Until rspamd's scanner has its compiled regular expressions: on a machine where
        rspamd never ran, its hs_helper compiles them for several seconds after start, while
        the scanner matches more slowly without them. Measuring then would understate rspamd
        (seen here: 236 msg/s on a first start, 254-311 afterwards)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(log, "rb") as f:
                    f.seek(start)
                    text = f.read()
            except OSError:
                return  # logging elsewhere: nothing to wait on
            if re.search(rb"hyperscan database[^\n]*has been loaded", text):
                return
            time.sleep(0.5)
        print("  note: rspamd's scanner did not report its hyperscan database loaded within "
              f"{timeout:.0f}s; measuring anyway", flush=True)

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self):
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                    time.sleep(0.1)
                except ProcessLookupError:
                    break
        except (OSError, ValueError):
            pass
        if self.saved is None:
            RSPAMD_OPTIONS.unlink(missing_ok=True)
        else:
            RSPAMD_OPTIONS.write_bytes(self.saved)


class Target:
    """One configuration to measure: ``start()`` returns (milter spec or None, pid or None)."""

    def __init__(self, key: str, label: str, start, stop=lambda: None, after=lambda: None):
        self.key, self.label, self.start, self.stop, self.after = key, label, start, stop, after


def targets(args, dns: Dnsmasq) -> list[Target]:
    out: list[Target] = []
    if not args.skip_postfix_alone:
        out.append(Target("postfix", "Postfix alone", lambda: (None, None)))
    if not args.skip_rspamd:
        box = {}

        def start_rspamd():
            box["r"] = Rspamd(dns.port)
            return "inet:127.0.0.1:11332", box["r"].pid()

        out.append(Target("rspamd", "Postfix + rspamd milter", start_rspamd,
                          lambda: box.pop("r").stop()))
    if args.pymilter_floor:
        for fw in (int(x) for x in args.floor_workers.split(",")):
            for content in (False, True) if args.floor_content else (False,):
                box = {}

                def start_null(fw=fw, content=content, box=box):
                    box["m"] = NullMilter(fw, content)
                    return box["m"].spec, box["m"].proc.pid

                out.append(Target(f"pymilter-null{'-content' if content else ''}-{fw}",
                                  f"Postfix + null pymilter ({'hdr+body' if content else 'eom'}, "
                                  f"{fw} proc)", start_null, lambda box=box: box.pop("m").stop()))

    # the null asyncio milter, plain (--native-floor) and doing fixed work (--floor-cpu), on
    # filterd's interpreter: the same protocol code, what filterd does beyond it is the rest
    work = [float(x) for x in args.floor_cpu.split(",") if x.strip()]
    for us in ([0.0] if args.native_floor else []) + work:
        box = {}

        def start_native(box=box, us=us):
            box["m"] = NullMilter(1, True, native=True, work_us=us, python=args.python[0])
            return box["m"].spec, box["m"].proc.pid

        key, label = "native-null-1", "Postfix + null asyncio milter (hdr+body, 1 proc)"
        if us:
            key, label = f"native-null-{us:g}us", f"{label} + {us:g} us of Python per msg"
        out.append(Target(key, label, start_native, lambda box=box: box.pop("m").stop()))

    def filterd_target(key, label, *overrides, workers, python=None):
        box = {}

        def start():
            box["m"] = FilterdMilterProc(f"dns.nameservers=[\"127.0.0.1:{dns.port}\"]",
                                         *overrides, *args.filterd_set, workers=workers,
                                         log_level="warning", python=python)
            return box["m"].spec, box["m"].proc.pid

        def after():
            if not box["m"].alive():
                print("  filterd milter died:\n" + box["m"].log()[-2000:])

        return Target(key, label, start, lambda: box.pop("m").stop(), after)

    for engine in args.engines.split(","):
        tag = "" if engine == "native" else f"-{engine}"
        for w in (int(x) for x in args.workers.split(",")):
            for i, py in enumerate(args.python):
                out.append(filterd_target(f"filterd{tag}-{w}" + (f"-py{i}" if i else ""),
                                          f"Postfix + filterd milter ({engine}, {w} proc"
                                          + (f", {py}" if i or py != sys.executable else "")
                                          + ")", f"milter.engine={engine}", workers=w,
                                          python=py))
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        overrides = [x.strip() for x in sets.split(";") if x.strip()]
        out.append(filterd_target(f"filterd-{name}", f"Postfix + filterd ({name})", *overrides,
                                  workers=1, python=args.python[0]))
    if args.core_variant:
        from filterd.pipeline import load_config_and_plugins

        _, infos = load_config_and_plugins(None, [], use_default_path=False)
        others = sorted(i.name for i in infos if i.name not in ("rules", "spam_headers"))
        print(f"(core variant: disabled {', '.join(others)})")
        out.append(filterd_target("filterd-core", "Postfix + filterd, core plugins",
                                  f"plugins.disabled={others!r}".replace("'", '"'), workers=1))
    return out


DEBIAN_VENV = ROOT / ".venv-debian"


def debian_venv() -> str:
    """The interpreter filterd's .deb runs on: a venv of Debian's /usr/bin/python3 with filterd's
    dependencies (what dh_virtualenv builds in /usr/lib/filterd), made once in .venv-debian by
    the Makefile. Debian builds its Python with profile-guided and link-time optimisation and
    links it statically; a pyenv or source build without --enable-optimizations runs the
    same milter with ~9 % more instructions per message and fewer per cycle."""
    installed = Path("/usr/lib/filterd/bin/python3")
    if installed.exists():
        return str(installed)
    if not Path("/usr/bin/python3").exists():
        raise SystemExit("--python debian: /usr/bin/python3 not found (apt-get install "
                         "python3 python3-venv python3-dev)")
    if not (DEBIAN_VENV / ".installed").exists():
        print(f"making {DEBIAN_VENV} (Debian's /usr/bin/python3 with filterd's dependencies)",
              flush=True)
    r = subprocess.run(["make", "-s", "venv", f"VENV={DEBIAN_VENV}", "PYTHON=/usr/bin/python3"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--python debian: making {DEBIAN_VENV} failed:\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    return str(DEBIAN_VENV / "bin" / "python")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--sessions", default="20,60")
    ap.add_argument("--workers", default="1,2", help="filterd milter worker counts to measure")
    ap.add_argument("--engines", default="native",
                    help="filterd milter engines to measure: native (the default engine), "
                         "pymilter (libmilter), or both: native,pymilter")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every target this many times, taking turns (rspamd, filterd, "
                         "rspamd, ...; each round starts one target later), and report the "
                         "median: a busy machine's noise shows")
    ap.add_argument("--python", default="",
                    help="Python interpreters to run filterd's milter with, comma-separated "
                         "(default: this one). 'debian' = the interpreter the .deb runs filterd "
                         "on: /usr/lib/filterd/bin/python3 when the package is installed, else "
                         "a venv of Debian's /usr/bin/python3 made once in .venv-debian. The "
                         "first one gets the plain filterd-N keys, the others -py1, -py2 ...")
    ap.add_argument("--skip-rspamd", action="store_true")
    ap.add_argument("--cpu-by-process", action="store_true",
                    help="print each run's CPU per message by process name (Postfix's daemons, "
                         "the milter, the sink): where the machine's time went")
    ap.add_argument("--skip-postfix-alone", action="store_true")
    ap.add_argument("--pymilter-floor", action="store_true",
                    help="also measure a pymilter milter that only adds one header: what any "
                         "milter built on pymilter can reach at best on this machine")
    ap.add_argument("--floor-workers", default="1",
                    help="process counts for --pymilter-floor (comma-separated)")
    ap.add_argument("--floor-content", action="store_true",
                    help="--pymilter-floor also with a null milter that takes headers and body")
    ap.add_argument("--native-floor", action="store_true",
                    help="also measure a null milter on filterd's own asyncio milter protocol "
                         "(takes headers and body, adds one header; on the first --python "
                         "interpreter, as filterd): that engine's floor")
    ap.add_argument("--floor-cpu", default="", metavar="US,US...",
                    help="also measure the null asyncio milter doing this many microseconds of "
                         "plain Python work per message (comma-separated; on the --python "
                         "interpreter): the CPU a milter may spend per message for a given "
                         "ratio to rspamd on this machine, measured in the same run")
    ap.add_argument("--core-variant", action="store_true",
                    help="also measure filterd with only the foundation's plugins (rules, "
                         "spam_headers), every other plugin disabled")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE;...",
                    help="also measure filterd (1 process) with these settings, as target "
                         "filterd-NAME: what a setting costs, measured in the same run "
                         "(e.g. 'no-user-limit:ratelimit.user.limit=0')")
    ap.add_argument("--filterd-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for the filterd milter (e.g. to see what a plugin costs)")
    args = ap.parse_args()
    args.sessions = [int(x) for x in args.sessions.split(",")]
    args.python = [debian_venv() if p.strip() == "debian" else p.strip()
                   for p in args.python.split(",") if p.strip()] or [sys.executable]
    for py in args.python:
        version = subprocess.run([py, "-c", "import sys; print(sys.version.split()[0])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        print(f"filterd runs on {py} (Python {version})", flush=True)
    print(f"milter benchmark: {args.messages} messages of {args.size} bytes per run, "
          f"sessions {args.sessions}, {os.cpu_count()} CPUs, {args.rounds} round(s)", flush=True)

    sink = Sink(capture=False)
    dns = Dnsmasq()
    runs: dict[str, list[dict]] = {}
    try:
        for rnd in range(args.rounds):
            if args.rounds > 1:
                print(f"round {rnd + 1} of {args.rounds}", flush=True)
            # each round starts one target later, so that no target always runs in the same
            # place of a round (the machine's speed drifts within a round as well)
            order = targets(args, dns)
            shift = rnd % len(order)
            for t in order[shift:] + order[:shift]:
                spec, pid = t.start()
                try:
                    runs.setdefault(t.key, []).append(measure(t.label, sink, spec, args, pid))
                    t.after()
                finally:
                    t.stop()
    finally:
        dns.stop()
        sink.stop()

    results = {k: {s: statistics.median(r[s] for r in rs) for s in args.sessions}
               for k, rs in runs.items()}
    print(f"\nsummary (msg/s{', median of %d rounds' % args.rounds if args.rounds > 1 else ''})")
    names = list(results)
    width = max([16] + [len(n) + 2 for n in names])
    print(f"  {'sessions':<10}" + "".join(f"{n:>{width}}" for n in names))
    for s in args.sessions:
        print(f"  {s:<10}" + "".join(f"{results[n].get(s, 0):>{width}.1f}" for n in names))
    if "rspamd" in results:
        for s in args.sessions:
            base = results["rspamd"][s]
            for n in names:
                if n.startswith(("filterd", "pymilter", "native")):
                    line = f"  ratio {n}/rspamd at {s} sessions: {results[n][s] / base:.2f}x"
                    if args.rounds > 1:
                        # each round against the rspamd run of the same round: the spread
                        # shows how much of a difference is this machine's noise
                        each = sorted(a[s] / b[s] for a, b in zip(runs[n], runs["rspamd"]))
                        line += f" (per round {each[0]:.2f}-{each[-1]:.2f}x)"
                    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
