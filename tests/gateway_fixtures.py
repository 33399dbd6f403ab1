"""Helpers for the SMTP front-door tests: real `filterd serve` processes, a real smtp-sink, a
real private Postfix, and a raw-socket SMTP client that sends exactly the bytes it is given.
Every server started here is stopped by its fixture."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Sink:
    """Postfix's smtp-sink on 127.0.0.1 (the one wrapper the tests and benchmarks share).
    With ``capture`` (default) every message goes to a file in ``dir``; ``extra`` are more
    smtp-sink options (``("-r", "rcpt")``: answer 4xx to every RCPT); ``lmtp``: speak LMTP."""

    def __init__(self, base: Path | None = None, extra: tuple = (), port: int | None = None, *,
                 lmtp: bool = False, capture: bool = True, backlog: int = 1000):
        # smtp-sink drops privileges to nobody: its directory must be reachable by nobody, so it
        # lives in its own world-traversable temp dir (pytest's tmp dirs are 0700)
        self.top = Path(tempfile.mkdtemp(prefix="filterd-sink-"))
        os.chmod(self.top, 0o755)
        self.dir = self.top / "msgs"
        self.dir.mkdir()
        os.chmod(self.dir, 0o777)
        self.port = port or free_port()
        cmd = ["smtp-sink"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        if capture:
            cmd += ["-d", f"{self.dir}/%M."]
        if lmtp:
            cmd.append("-L")
        cmd += [*extra, f"127.0.0.1:{self.port}", str(backlog)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port)

    def messages(self) -> list[bytes]:
        out = []
        for f in sorted(self.dir.rglob("*")):
            try:
                if f.is_file():
                    out.append(f.read_bytes())
            except OSError:
                pass
        return out

    def count(self) -> int:
        return sum(1 for f in self.dir.rglob("*") if f.is_file())

    def wait_count(self, n: int, timeout: float = 20.0) -> list[bytes]:
        wait_for(lambda: self.count() >= n, timeout, f"{n} message(s) at the sink")
        time.sleep(0.3)  # a little longer: more than n would be a failure
        return self.messages()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.top, ignore_errors=True)


class Gateway:
    """A real `filterd serve` subprocess on a free port."""

    def __init__(self, base: Path, *args: str, config_text: str = "", env=None):
        self.base = base
        self.state = base / f"state-{free_port()}"
        self.state.mkdir(parents=True)
        self.log_path = self.state / "serve.log"
        cmd = [sys.executable, "-m", "filterd", "serve", "--log-level", "info",
               "--set", f"server.state_dir={self.state}", "--set", "server.hostname=gw.test"]
        # always an explicit config file: never pick up a machine's /etc/filterd/filterd.toml
        cfg = self.state / "filterd.toml"
        cfg.write_text(config_text or "# test gateway: settings come from --set\n")
        cmd += ["--config", str(cfg)]
        if not any(a.startswith("--listen") for a in args):
            cmd += ["--listen", "127.0.0.1:0"]
        cmd += list(args)
        e = dict(os.environ)
        e.pop("FILTERD_CONFIG", None)
        e.update(env or {})
        self.cmd = cmd
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=e,
                                     cwd=str(ROOT))
        self.ports = self._wait_ready()
        self.port = self.ports.get("smtp") or self.ports.get("proxy")

    def _wait_ready(self) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = re.findall(r"filterd: ready: (\w+) on [^\s]+:(\d+)", text)
            if found and "ready (mode" in text:
                return {k: int(p) for k, p in found}
            if self.proc.poll() is not None:
                raise AssertionError(f"filterd serve exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError("filterd serve not ready:\n" + self.log_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode

    def spool_files(self, area: str = "active") -> list[Path]:
        d = self.state / "spool" / area
        return [p for p in d.iterdir() if not p.name.endswith(".state")] if d.is_dir() else []


class Raw:
    """An SMTP client that sends exactly the bytes it is given and reads replies."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One (possibly multi-line) reply: (code, full text)."""
        lines = []
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("server closed the connection; got so far: "
                                          + repr(b"".join(lines) + self.buf))
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            lines.append(line + b"\n")
            if len(line) < 4 or line[3:4] == b" ":
                text = b"".join(lines).decode("utf-8", "replace")
                return int(line[:3]), text

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line + "\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def start_session(port: int, ehlo: str = "client.test") -> Raw:
    r = Raw(port)
    code, text = r.reply()
    assert code == 220, text
    code, text = r.cmd(f"EHLO {ehlo}")
    assert code == 250, text
    return r


def message(subject: str = "hello", body: str = "Hello there.\r\n",
            extra: str = "") -> str:
    return (f"From: a@example.com\r\nTo: b@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n{extra}\r\n{body}")


# ------------------------------------------------------------------------------------------
# Postfix
# ------------------------------------------------------------------------------------------
class Postfix:
    """A private Postfix instance on high ports (see ../shared/RECIPES.md)."""

    def __init__(self, name: str, main_extra: str, master_extra: str, port: int):
        if not shutil.which("postfix"):
            pytest.skip("postfix is not installed")
        self.tmp = Path(tempfile.mkdtemp(prefix=f"pf-{name}-"))
        os.chmod(self.tmp, 0o755)
        self.conf = self.tmp / "pf"
        self.queue = self.tmp / "q"
        self.conf.mkdir()
        self.queue.mkdir()
        self.port = port
        master = Path("/etc/postfix/master.cf")
        if not master.exists():
            master = Path("/usr/share/postfix/master.cf.dist")
        text = master.read_text()
        text = re.sub(r"(?m)^smtp(\s+)inet", f"127.0.0.1:{port}\\1inet", text)
        (self.conf / "master.cf").write_text(text + "\n" + master_extra)
        (self.conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {self.queue}
data_directory = {self.queue}/data
myhostname = {name}.pf.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
maillog_file = {self.tmp}/maillog
maillog_file_prefixes = {self.tmp}
smtputf8_enable = no
{main_extra}
""")
        subprocess.run(["postconf", "-c", str(self.conf), "-F", "*/*/chroot = n"], check=True)
        r = subprocess.run(["postfix", "-c", str(self.conf), "start"], capture_output=True)
        if r.returncode != 0:
            raise AssertionError(f"postfix start failed: {r.stderr.decode()}\n{self.maillog()}")
        wait_port(port)

    def maillog(self) -> str:
        p = self.tmp / "maillog"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True)
        time.sleep(0.3)
        shutil.rmtree(self.tmp, ignore_errors=True)
