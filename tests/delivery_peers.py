"""Real downstream peers for the queue/delivery tests (loopback only): Postfix's smtp-sink,
a capturing aiosmtpd server with scripted replies, and a tiny LMTP server. Plus helpers to
build a spool + delivery core from --set style overrides."""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from aiosmtpd.controller import Controller


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class Capture:
    """aiosmtpd handler that records every transaction and answers RCPT/DATA from a script:
    ``rcpt_replies[address]`` and ``data_replies`` are lists consumed one per attempt
    (then 250)."""

    def __init__(self):
        self.messages: list[dict] = []
        self.rcpt_replies: dict[str, list[str]] = {}
        self.data_replies: list[str] = []
        self.rcpt_attempts: dict[str, int] = {}
        self.sessions = 0
        self.tls_sessions = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_attempts[address] = self.rcpt_attempts.get(address, 0) + 1
        script = self.rcpt_replies.get(address)
        if script:
            return script.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append({"from": envelope.mail_from, "to": list(envelope.rcpt_tos),
                              "data": envelope.original_content or envelope.content,
                              "mail_options": list(envelope.mail_options),
                              "tls": session.ssl is not None})
        return "250 2.0.0 Ok: queued"

    def to(self, address: str) -> list[dict]:
        return [m for m in self.messages if address in m["to"]]


class CaptureServer:
    def __init__(self, tls_context=None):
        self.handler = Capture()
        self.port = free_port()
        kw = {}
        if tls_context is not None:
            kw["tls_context"] = tls_context
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     decode_data=False, **kw)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


class MiniLMTP:
    """An LMTP server (RFC 2033) answering per recipient after the data, from ``results``
    (address -> reply line; default 250). Runs on the test's event loop."""

    def __init__(self, results: dict[str, str] | None = None, unix_path: str = "",
                 smtp: bool = False, broken_starttls: bool = False):
        self.results = results or {}
        self.smtp = smtp  # plain SMTP (EHLO, one reply after the data) instead of LMTP
        self.broken_starttls = broken_starttls  # offer STARTTLS, then garble the handshake
        self.sessions = 0
        self.delivered: list[tuple[str, bytes]] = []
        self.unix_path = unix_path
        self.port = 0
        self.server = None

    async def start(self):
        if self.unix_path:
            self.server = await asyncio.start_unix_server(self._session, self.unix_path)
        else:
            self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _session(self, reader, writer):
        def send(line):
            writer.write(line.encode() + b"\r\n")
        self.sessions += 1
        send("220 mini-lmtp LMTP ready")
        rcpts: list[str] = []
        while True:
            line = (await reader.readline()).decode().rstrip("\r\n")
            if not line:
                break
            cmd = line[:4].upper()
            if cmd == ("EHLO" if self.smtp else "LHLO"):
                tls = "250-STARTTLS\r\n" if self.broken_starttls else ""
                send(f"250-mini\r\n{tls}250-PIPELINING\r\n250 ENHANCEDSTATUSCODES")
            elif cmd == "STAR" and self.broken_starttls:
                send("220 2.0.0 go ahead")
                await writer.drain()
                writer.write(b"this is not a TLS server hello\r\n" * 10)
                await writer.drain()
                break
            elif cmd == "MAIL":
                rcpts = []
                send("250 2.1.0 ok")
            elif cmd == "RCPT":
                addr = line.split("<", 1)[1].split(">", 1)[0]
                rcpts.append(addr)
                send("250 2.1.5 ok")
            elif cmd == "DATA":
                send("354 go ahead")
                data = b""
                while True:
                    chunk = await reader.readline()
                    if chunk == b".\r\n":
                        break
                    data += chunk
                if self.smtp:
                    self.delivered += [(r, data) for r in rcpts]
                    send("250 2.0.0 queued")
                else:
                    for r in rcpts:
                        rep = self.results.get(r, "250 2.0.0 delivered")
                        if rep.startswith("2"):
                            self.delivered.append((r, data))
                        send(rep)
            elif cmd == "QUIT":
                send("221 bye")
                break
            elif cmd == "RSET":
                send("250 ok")
            else:
                send("500 5.5.1 unknown")
            await writer.drain()
        writer.close()

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def _as_toml(overrides: list[str]) -> tuple[list[str], str]:
    """--set cannot name keys with dots (domains): turn `a.b."x.y"=v` into TOML text."""
    plain, tables = [], {}
    for o in overrides:
        m = re.match(r'^([\w.]+)\."([^"]+)"=(.*)$', o)
        if not m:
            plain.append(o)
            continue
        tables.setdefault(m.group(1), []).append(f'"{m.group(2)}" = "{m.group(3)}"')
    text = "".join(f"[{t}]\n" + "\n".join(lines) + "\n" for t, lines in tables.items())
    return plain, text


async def make_core(state: Path, *overrides: str, resolver=None, pipeline=None, start=True):
    """Config + Spool + DeliveryCore on ``state``; retries fast, fsync on. Overrides are --set
    style; `section.table."domain.name"=value` is allowed too."""
    from filterd import config as config_mod
    from filterd.delivery import DeliveryCore
    from filterd.queue import Spool
    from filterd.services import Services

    ov = [f"server.state_dir={state}", "server.hostname=gw.test", "delivery.retry_initial=200ms",
          "delivery.retry_max=1s", "delivery.connect_timeout=5s", "delivery.command_timeout=10s",
          "delivery.data_timeout=10s", "queue.scan_interval=1s", *overrides]
    ov, text = _as_toml(ov)
    path = None
    if text:
        path = state / f"filterd-{len(list(state.glob('filterd-*.toml')))}.toml"
        path.write_text(text)
    cfg = config_mod.load(str(path) if path else None, ov, use_default_path=False)
    spool = Spool(state / "spool")
    services = Services(cfg, resolver=resolver)
    core = DeliveryCore(cfg, spool, services, pipeline)
    if start:
        await core.start()
    return core


async def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_cert(d: Path) -> tuple[str, str]:
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    return str(cert), str(key)


def have_smtp_sink() -> bool:
    return shutil.which("smtp-sink") is not None
