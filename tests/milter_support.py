"""Real peers for the milter tests and benchmark: a private Postfix instance (own config and
queue directories, loopback high ports), smtp-sink capturing what Postfix relays, and a
`filterd milter` subprocess. Everything started here is stopped by the caller's finalizers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway_fixtures import Sink  # noqa: F401 - the shared smtp-sink wrapper

ROOT = Path(__file__).resolve().parent.parent


# The milter engine FilterdMilterProc starts (tests/conftest.py's milter_engine fixture runs the
# milter tests once per engine).
ENGINE = "native"


def have_postfix() -> bool:
    return all(shutil.which(x) for x in ("postfix", "smtp-sink", "postconf")) or all(
        os.path.exists(f"/usr/sbin/{x}") for x in ("postfix", "smtp-sink", "postconf"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on "
                               f"{port}:\n{out}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _tmpdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


class Postfix:
    """A throw-away Postfix: never touches /etc/postfix or the system queue."""

    def __init__(self, relay_port: int, milter: str | None = None, extra: dict | None = None):
        self.port = free_port()
        self.tmp = _tmpdir("filterd-pf-")
        self.conf = self.tmp / "pf"
        self.queue = self.tmp / "q"
        self.conf.mkdir()
        self.queue.mkdir()
        master = Path("/etc/postfix/master.cf")
        if not master.exists():
            master = Path("/usr/share/postfix/master.cf.dist")
        text = master.read_text()
        import re

        text = re.sub(r"(?m)^smtp(\s+)inet", f"{self.port}\\1inet", text)
        (self.conf / "master.cf").write_text(text)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.queue / "data"),
            "myhostname": "test.example",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "relayhost": f"[127.0.0.1]:{relay_port}",
            "maillog_file": str(self.tmp / "maillog"),
            "maillog_file_prefixes": str(self.tmp),
            "smtpd_banner": "$myhostname ESMTP",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            "default_destination_concurrency_limit": "50",
            "smtpd_client_connection_count_limit": "0",
            "smtpd_client_connection_rate_limit": "0",
            "default_process_limit": "200",
            "in_flow_delay": "0",
        }
        if milter:
            settings["smtpd_milters"] = milter
            settings["milter_default_action"] = "tempfail"
        settings.update(extra or {})
        (self.conf / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True)
        r = subprocess.run(["postfix", "-c", str(self.conf), "start"], capture_output=True)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace')}\n{self.log()}")
        wait_port(self.port)

    def log(self) -> str:
        p = self.tmp / "maillog"
        return p.read_text(errors="replace") if p.exists() else ""

    def queue_listing(self) -> str:
        r = subprocess.run(["postqueue", "-c", str(self.conf), "-p"], capture_output=True)
        return r.stdout.decode(errors="replace")

    def held(self) -> list[Path]:
        d = self.queue / "hold"
        return [p for p in d.rglob("*") if p.is_file()] if d.exists() else []

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.queue / sub
            if d.exists() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], capture_output=True)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        # wait for master to exit so the queue can be removed
        pidf = self.queue / "pid" / "master.pid"
        for _ in range(50):
            if not pidf.exists():
                break
            time.sleep(0.1)
        shutil.rmtree(self.tmp, ignore_errors=True)


class FilterdMilterProc:
    """`filterd milter` as a subprocess on a free loopback port."""

    def __init__(self, *overrides: str, workers: int = 1, state_dir: str | None = None,
                 log_level: str = "info", env: dict | None = None, config: str | None = None,
                 engine: str | None = None, python: str | None = None):
        self.port = free_port()
        self.own_state = not state_dir
        self.state = Path(state_dir) if state_dir else _tmpdir("filterd-milter-state-")
        self.stderr_path = self.state / "milter.log"
        e = dict(os.environ)
        e.pop("FILTERD_CONFIG", None)
        e.update(env or {})
        cmd = [python or sys.executable, "-m", "filterd", "milter", "--log-level", log_level,
               "--listen", f"inet:{self.port}@127.0.0.1", "--workers", str(workers),
               "--set", f"server.state_dir={self.state}",
               "--set", f"milter.engine={engine or ENGINE}"]
        if not config:  # never pick up /etc/filterd of the machine the tests run on
            config = self.state / "empty.toml"
            config.write_text("")
        cmd += ["--config", str(config)]
        for o in overrides:
            cmd += ["--set", o]
        self.errf = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.errf, env=e,
                                     cwd=str(ROOT))
        try:
            wait_port(self.port, 30)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"filterd milter did not start:\n"
                               f"{self.stderr_path.read_text(errors='replace')}")
        self.spec = f"inet:127.0.0.1:{self.port}"

    def log(self) -> str:
        if not self.errf.closed:
            self.errf.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once it holds ``text`` (or as it is after ``timeout`` seconds): what the
        milter logs after it has answered may land after the client has its reply."""
        deadline = time.monotonic() + timeout
        while text not in (out := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.errf.close()
        if self.own_state:
            shutil.rmtree(self.state, ignore_errors=True)
