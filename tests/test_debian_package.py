"""The Debian package, as a user gets it: built from a clean checkout with `make deb`, installed
with apt, started the way its systemd unit starts it (as the filterd user), mail sent through
it with swaks to smtp-sink, then removed and purged without leaving anything behind.

Needs root and the build tools (.ci/run installs them); it installs the package on the machine.
"""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from gateway_fixtures import Sink, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("dpkg-buildpackage", "dh_virtualenv", "lintian", "apt-get", "swaks", "git")

MISSING = "" if os.geteuid() == 0 and all(shutil.which(t) for t in NEEDED) else \
    f"needs root and {', '.join(NEEDED)} (installed by .ci/run)"


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.mark.timeout(1200)
def test_deb_builds_installs_runs_and_purges_cleanly():
    if MISSING:  # in CI a missing tool is a failure, not a reason to skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)(MISSING)
    if shutil.which("filterd") and Path("/usr/lib/filterd").exists():
        run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "purge", "-y", "filterd"])
    work = Path(tempfile.mkdtemp(prefix="filterd-deb-"))
    sink = None
    proc = None
    try:
        # build from a clean checkout of what is committed
        run(["git", "clone", "-q", str(ROOT), str(work / "src")])
        run(["make", "deb"], cwd=work / "src", timeout=1100)
        [deb] = list((work / "src" / "build" / "deb").glob("filterd_*.deb"))
        run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", str(deb)],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)

        assert run(["filterd", "--version"]).stdout.startswith("filterd ")
        # the package's C parts were built for its interpreter (the Bayes word splitter)
        assert run(["/usr/lib/filterd/bin/python3", "-c", "from filterd.bayes import tokenizer; "
                    "print(tokenizer.SPEEDUPS)"]).stdout.strip() == "True"
        assert "configuration OK" in run(["filterd", "config", "check"]).stdout
        assert pwd.getpwnam("filterd").pw_shell == "/usr/sbin/nologin"
        assert Path("/etc/filterd/conf.d").is_dir() and Path("/var/spool/filterd").is_dir()
        unit = Path("/lib/systemd/system/filterd.service").read_text()
        assert "User=filterd" in unit and "ProtectSystem=strict" in unit
        assert Path("/lib/systemd/system/filterd-digest.timer").exists()

        # run it as the unit does, with a conf.d drop-in for loopback ports
        sink = Sink()
        port = free_port()
        dropin = Path("/etc/filterd/conf.d/50-test.toml")
        dropin.write_text(f'[smtp]\nlisten = ["127.0.0.1:{port}"]\n'
                          f'[delivery]\nrelayhost = "127.0.0.1:{sink.port}"\n')
        exec_start = next(line.split("=", 1)[1] for line in unit.splitlines()
                          if line.startswith("ExecStart="))
        # as User=filterd/Group=filterd in the unit: the daemon itself, not a wrapper, so the
        # SIGTERM below reaches it as systemd's would
        proc = subprocess.Popen(shlex.split(exec_start), user="filterd", group="filterd",
                                extra_groups=[], cwd="/", stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        wait_port(port, 60)
        run(["swaks", "--server", f"127.0.0.1:{port}", "--from", "alice@example.com",
             "--to", "bob@example.net", "--header", "Subject: via the deb", "--silent", "2"])
        msgs = sink.wait_count(1, 60)
        assert b"Subject: via the deb" in msgs[0] and b"X-Filterd-ID:" in msgs[0]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log = proc.stdout.read().decode(errors="replace")
        assert code == 0, log
        assert "stopped" in log
        proc = None
        dropin.unlink()

        run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "purge", "-y", "filterd"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        assert subprocess.run(["dpkg", "-s", "filterd"], capture_output=True).returncode != 0
        for path in ("/usr/lib/filterd", "/usr/bin/filterd", "/etc/filterd", "/var/lib/filterd",
                     "/var/spool/filterd", "/lib/systemd/system/filterd.service"):
            assert not Path(path).exists(), f"{path} left after purge"
        assert subprocess.run(["getent", "passwd", "filterd"], capture_output=True).returncode != 0
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "/usr/lib/filterd/bin" not in ps
    finally:
        if proc is not None:
            proc.kill()
        if sink is not None:
            sink.stop()
        shutil.rmtree(work, ignore_errors=True)
