"""The inbound SMTP server: a small, strict ESMTP state machine on asyncio streams.

Why our own state machine rather than aiosmtpd: the things this front door must guarantee are
all in the byte handling, and they are easier to prove in ~600 lines we control than to patch
around in a general library:

- DATA ends *only* at CRLF.CRLF on the wire. Bare LF, bare CR and NUL never end or split
  anything; what happens to them (reject or normalize/strip) is a setting, decided after the real
  end of DATA (SMTP smuggling, CVE-2023-51764/51765/51766 family).
- Sizes are enforced while reading: beyond ``max_message_size`` the data is read and *discarded*
  (only the last four bytes are kept to find the end), then 552 is answered.
- Command lines have a hard length limit; an over-long line is discarded up to its end, answered
  with 500, and never parsed.
- Replies to pipelined commands are written in one go; PIPELINING is only honoured after EHLO,
  and data a client sends ahead of STARTTLS is thrown away (STARTTLS command injection).

One :class:`SMTPConnection` per client drives the pipeline phase by phase; a *backend* decides
what accepting a message means (gateway: spool it; proxy: forward it to the next hop).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.utils import format_datetime
from datetime import datetime, timezone

from ..model import Session
from ..verdict import Action, Verdict
from .relay import AddressError, RelayPolicy, parse_path

log = logging.getLogger("filterd.smtp")

CRLF = b"\r\n"
EOD = b"\r\n.\r\n"


class ClientGone(Exception):
    """The client closed the connection or timed out."""


class _TooLong(Exception):
    pass


@dataclass
class Settings:
    hostname: str = "localhost"
    banner: str = "filterd"
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    max_command_line: int = 2048
    long_lines: str = "reject"
    bare_newlines: str = "reject"
    nul_bytes: str = "reject"
    max_hops: int = 50
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    max_sessions: int = 1000
    max_sessions_per_ip: int = 50
    max_errors: int = 20
    strict_pipelining: bool = True
    vrfy: bool = False
    require_tls: bool = False
    auth_on_inbound: bool = False
    xforward: bool = True
    add_received: bool = True
    ssl_context: ssl.SSLContext | None = None
    users: object = None  # auth.UserDB or None

    @classmethod
    def from_config(cls, cfg) -> "Settings":
        hostname = cfg.get("smtp.hostname") or cfg.get("server.hostname") or socket.getfqdn()
        s = cls(
            hostname=hostname,
            banner=cfg.get("smtp.banner"),
            max_message_size=cfg.size("smtp.max_message_size"),
            max_recipients=int(cfg.get("smtp.max_recipients")),
            max_command_line=max(512, int(cfg.get("smtp.max_command_line"))),
            long_lines=cfg.get("smtp.long_lines"),
            bare_newlines=cfg.get("smtp.bare_newlines"),
            nul_bytes=cfg.get("smtp.nul_bytes"),
            max_hops=int(cfg.get("smtp.max_hops")),
            command_timeout=cfg.duration("smtp.command_timeout"),
            data_timeout=cfg.duration("smtp.data_timeout"),
            max_sessions=int(cfg.get("smtp.max_sessions")),
            max_sessions_per_ip=int(cfg.get("smtp.max_sessions_per_ip")),
            max_errors=int(cfg.get("smtp.max_errors")),
            strict_pipelining=bool(cfg.get("smtp.strict_pipelining")),
            vrfy=bool(cfg.get("smtp.vrfy")),
            require_tls=bool(cfg.get("smtp.require_tls")),
            auth_on_inbound=bool(cfg.get("smtp.auth_on_inbound")),
            xforward=bool(cfg.get("smtp.xforward")),
        )
        cert, key = cfg.get("smtp.tls_cert"), cfg.get("smtp.tls_key")
        if cert or key:
            from ..config import ConfigError, ConfigProblem
            if not (cert and key):
                raise ConfigError([ConfigProblem("", None, "smtp.tls_cert",
                                                 "tls_cert and tls_key must be set together")])
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError([ConfigProblem(cert, None, "smtp.tls_cert",
                                                 f"cannot load certificate/key ({key}): {exc}")])
            s.ssl_context = ctx
        uf = cfg.get("smtp.users_file")
        if uf:
            from ..config import ConfigError, ConfigProblem
            from .auth import UserDB
            try:
                s.users = UserDB(uf)
            except (OSError, ValueError) as exc:
                raise ConfigError([ConfigProblem(uf, None, "smtp.users_file", str(exc))])
        return s


class Input:
    """Buffered input with line and EOD framing (the StreamReader cannot give bytes back)."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader
        self.buf = bytearray()

    async def _fill(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):  # cheaper than wait_for (no extra task)
                chunk = await self.reader.read(65536)
        except TimeoutError:
            raise ClientGone("timeout") from None
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from None
        if not chunk:
            raise ClientGone("eof")
        self.buf += chunk

    async def readline(self, limit: int, timeout: float) -> bytes:
        """One line including its LF. Raises _TooLong (after discarding through the LF)."""
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if i + 1 > limit:
                    del self.buf[: i + 1]
                    raise _TooLong()
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > limit:
                # discard the rest of this line as it arrives
                self.buf.clear()
                while True:
                    await self._fill(timeout)
                    j = self.buf.find(b"\n")
                    if j >= 0:
                        del self.buf[: j + 1]
                        raise _TooLong()
                    self.buf.clear()
            start = len(self.buf)
            await self._fill(timeout)

    async def read_data(self, max_size: int, timeout: float) -> tuple[bytes | None, int]:
        """Read DATA content through CRLF.CRLF. Returns (content with its final CRLF, still
        dot-stuffed, or None when larger than max_size; wire size)."""
        pos = 0
        oversized = False
        discarded = 0
        while True:
            # The content starts right after the DATA command's CRLF, so a ".\r\n" at its very
            # start is the end of an empty message.
            if not discarded and self.buf[:3] == b".\r\n":
                del self.buf[:3]
                return b"", 0
            i = self.buf.find(EOD, max(0, pos - 4))
            if i >= 0:
                end = i + 2  # keep the CRLF that ends the last line
                size = discarded + end
                content = None if oversized or size > max_size else bytes(self.buf[:end])
                del self.buf[: i + 5]
                return content, size
            pos = len(self.buf)
            if pos > max_size + 5 or oversized:
                # over the limit: keep only the tail that may start the end marker
                oversized = True
                keep = self.buf[-4:]
                discarded += len(self.buf) - len(keep)
                self.buf[:] = keep
                pos = len(self.buf)
            await self._fill(timeout)

    def pending(self) -> bool:
        return bool(self.buf)


def unstuff(content: bytes) -> bytes:
    """Undo dot-stuffing on CRLF lines (RFC 5321 4.5.2)."""
    if content.startswith(b".."):
        content = content[1:]
    return content.replace(b"\r\n..", b"\r\n.")


def content_problem(content: bytes, s: Settings) -> tuple[bytes | None, tuple | None]:
    """Check/repair the received content per settings: (content, None) or (None, reply)."""
    if b"\x00" in content:
        if s.nul_bytes == "reject":
            return None, (550, "5.6.0", "Message contains NUL bytes; not accepted")
        content = content.replace(b"\x00", b"")
    n_crlf = content.count(b"\r\n")
    if content.count(b"\n") != n_crlf or content.count(b"\r") != n_crlf:
        if s.bare_newlines == "reject":
            return None, (550, "5.6.0", "Message contains bare CR or LF characters (lines must "
                                        "end with CRLF, RFC 5321 2.3.8); not accepted")
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if s.long_lines == "reject" and len(content) > 1000:
        if max(map(len, content.split(b"\r\n"))) > 998:
            return None, (550, "5.6.0", "Message has a line longer than 998 octets "
                                        "(RFC 5322 2.1.1); not accepted")
    return content, None


def count_hops(content: bytes) -> int:
    """Received: headers in the header block."""
    head_end = content.find(b"\r\n\r\n")
    head = content if head_end < 0 else content[: head_end + 2]
    return len(re.findall(rb"(?im)^received:", head))


def received_header(session: Session, hostname: str, proto: str, qid: str,
                    recipients: list[str]) -> bytes:
    helo = session.helo or "unknown"
    rdns = session.peer_name or "unknown"
    ip = session.peer_ip
    ipl = f"IPv6:{ip}" if ":" in ip else ip
    tls = ""
    if session.tls:
        tls = f"\r\n\t(using {session.tls_version} with cipher {session.tls_cipher})"
    auth = "\r\n\t(authenticated sender)" if session.auth_user else ""
    rcpt = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    h = (f"Received: from {_clean(helo)} ({_clean(rdns)} [{ipl}]){tls}{auth}\r\n"
         f"\tby {hostname} (filterd) with {proto} id {qid}{rcpt};\r\n"
         f"\t{format_datetime(datetime.now(timezone.utc))}\r\n")
    return h.encode("utf-8", "replace")


def _clean(s: str) -> str:
    return re.sub(r"[^\x21-\x7e\u0080-\uffff]", "?", s)[:255] or "unknown"


# ------------------------------------------------------------------------------------------
# End-of-DATA policy: per-recipient outcomes -> one reply
# ------------------------------------------------------------------------------------------
@dataclass
class Disposition:
    """How the front door treats each recipient after the scan (see docs/smtp.md):

    - any TEMPFAIL recipient -> 451 for the whole message (nothing accepted, the client retries
      all recipients; no duplicates);
    - else, no recipient to deliver, hold or discard -> the (first) REJECT reply;
    - else 250: ``deliver`` recipients are queued/forwarded, ``hold`` ones quarantined,
      ``discard`` ones dropped; ``dropped`` (REJECT recipients of a mixed message) are dropped
      without a DSN (no backscatter), logged and reported through the ``bounced`` event.
    """

    deliver: list[str] = field(default_factory=list)
    hold: list[str] = field(default_factory=list)
    discard: list[str] = field(default_factory=list)
    dropped: dict[str, Verdict] = field(default_factory=dict)
    reply: tuple | None = None  # a non-250 final reply, when nothing is accepted


def dispose(result) -> Disposition:
    d = Disposition()
    temp: Verdict | None = None
    rej: Verdict | None = None
    for addr, o in result.outcomes.items():
        a = o.action
        if a is Action.TEMPFAIL:
            temp = temp or o.verdict
        elif a is Action.REJECT:
            rej = rej or o.verdict
            d.dropped[addr] = o.verdict
        elif a is Action.QUARANTINE:
            d.hold.append(addr)
        elif a is Action.DISCARD:
            d.discard.append(addr)
        else:
            d.deliver.append(addr)
    if temp is not None:
        d.reply = temp.smtp_reply()
    elif not (d.deliver or d.hold or d.discard):
        d.reply = rej.smtp_reply() if rej else (554, "5.5.1", "No valid recipients")
    return d


# ------------------------------------------------------------------------------------------
# One client session
# ------------------------------------------------------------------------------------------
class SMTPConnection:
    def __init__(self, server: "SMTPServer", listener: "ListenerSpec",
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.listener = listener
        self.s: Settings = server.settings
        self.pipeline = server.pipeline
        self.relay: RelayPolicy = server.relay
        self.reader, self.writer = reader, writer
        self.input = Input(reader)
        peer = writer.get_extra_info("peername") or ("0.0.0.0", 0)
        local = writer.get_extra_info("sockname") or ("0.0.0.0", 0)
        self.session = Session(peer_ip=peer[0], peer_port=peer[1], local_ip=local[0],
                               local_port=local[1], front_door=listener.kind)
        self.esmtp = False
        self.greeted = False
        self.ctx = None  # ScanContext of the current transaction
        self.rcpts: list[str] = []
        self.rcpt_params: dict[str, dict] = {}
        self.errors = 0
        self.refused: tuple | None = None  # connect-time 554: only QUIT allowed
        self.backend = server.backend_factory(self)
        self.closing = False
        self.xforward: dict[str, str] = {}

    # -- output --------------------------------------------------------------------------------
    def reply(self, code: int, text: str, enhanced: str | None = None, lines=()) -> None:
        texts = list(lines) or [text]
        out = []
        for i, t in enumerate(texts):
            sep = "-" if i < len(texts) - 1 else " "
            enh = f"{enhanced} " if enhanced else ""
            out.append(f"{code}{sep}{enh}{t}\r\n")
        self.writer.write("".join(out).encode("utf-8", "replace"))

    def reply_t(self, r: tuple) -> None:
        code, enh, text = r
        self.reply(code, text, enh)

    async def flush(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            raise ClientGone("connection closed")
        if transport.get_write_buffer_size() < 65536:
            return  # replies went straight to the socket: nothing to wait for
        try:
            async with asyncio.timeout(self.s.command_timeout):
                await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    # -- main loop -------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._run()
        except ClientGone as exc:
            if str(exc) == "timeout":
                try:
                    self.reply(421, f"{self.s.hostname} Timeout, closing connection", "4.4.2")
                except Exception:  # noqa: BLE001
                    pass
            log.info("session %s [%s]: client gone (%s)%s", self.session.id,
                     self.session.peer_ip, exc, " during a transaction" if self.ctx else "")
        except Exception:  # noqa: BLE001 - one session must never take the server down
            log.exception("session %s [%s]: internal error", self.session.id,
                          self.session.peer_ip)
            try:
                self.reply(421, "Local error, closing connection", "4.3.0")
                await self.flush()
            except Exception:  # noqa: BLE001
                pass
        finally:
            try:
                await self.backend.close()
            except Exception:  # noqa: BLE001
                log.exception("session %s: backend close failed", self.session.id)
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _run(self) -> None:
        v = None
        try:
            v = await self.pipeline.connect(self.session)
        except Exception:  # noqa: BLE001
            log.exception("connect hook failed for %s", self.session.peer_ip)
            v = Verdict.tempfail("Temporary local problem", code=421, enhanced="4.3.0")
        if v is not None and v.action is Action.TEMPFAIL:
            self.reply(421, f"{self.s.hostname} {v.smtp_reply()[2]}", "4.7.0")
            await self.flush()
            return
        if v is not None and v.action is Action.REJECT:
            code, enh, text = v.smtp_reply()
            self.refused = (554, enh, text)
            self.reply(554, f"{self.s.hostname} {text}", None)
        else:
            self.reply(220, f"{self.s.hostname} ESMTP {self.s.banner}")
        await self.flush()
        while not self.closing:
            try:
                line = await self.input.readline(self.s.max_command_line, self.s.command_timeout)
            except _TooLong:
                self.reply(500, "Command line too long", "5.5.2")
                await self._error()
                continue
            await self.handle_line(line)
            if not self.input.pending() or self.closing:
                await self.flush()

    async def _error(self) -> None:
        self.errors += 1
        if self.errors >= self.s.max_errors:
            self.reply(421, f"{self.s.hostname} Too many errors, closing connection", "4.7.0")
            await self.flush()
            self.closing = True

    async def handle_line(self, line: bytes) -> None:
        if line.endswith(b"\r\n"):
            line = line[:-2]
        else:
            line = line[:-1]  # bare-LF terminated command: tolerated
        if b"\r" in line or b"\x00" in line:
            self.reply(500, "Bare CR or NUL in command line", "5.5.2")
            return await self._error()
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.reply(500, "Command line is not UTF-8", "5.5.2")
            return await self._error()
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if self.refused and verb not in ("QUIT", "NOOP"):
            self.reply(503, "Service refused; only QUIT is allowed", "5.5.1")
            return await self._error()
        if (self.s.strict_pipelining and self.input.pending() and
                (not self.esmtp or verb in ("EHLO", "HELO", "DATA", "STARTTLS", "AUTH"))
                and verb not in ("QUIT",)):
            self.reply(503, "Improper use of SMTP command pipelining", "5.5.0")
            self.input.buf.clear()
            return await self._error()
        handler = getattr(self, "cmd_" + verb, None) if verb.isalpha() else None
        if handler is None:
            self.reply(502, "Command not implemented", "5.5.2")
            return await self._error()
        await handler(arg)

    # -- commands ------------------------------------------------------------------------------
    async def cmd_QUIT(self, arg):
        self.reply(221, f"{self.s.hostname} Bye", "2.0.0")
        self.closing = True

    async def cmd_NOOP(self, arg):
        self.reply(250, "OK", "2.0.0")

    async def cmd_HELP(self, arg):
        self.reply(214, "See RFC 5321", "2.0.0")

    async def cmd_VRFY(self, arg):
        if not self.s.vrfy:
            self.reply(502, "VRFY command is disabled", "5.5.1")
            return
        self.reply(252, "Cannot VRFY user, but will accept the message", "2.5.2")

    async def cmd_EXPN(self, arg):
        self.reply(502, "EXPN not available", "5.5.1")

    async def cmd_RSET(self, arg):
        await self._reset()
        self.reply(250, "OK", "2.0.0")

    async def _reset(self) -> None:
        if self.ctx is not None:
            await self.backend.rset()
        self.ctx = None
        self.rcpts = []
        self.rcpt_params = {}

    async def cmd_HELO(self, arg):
        await self._helo(arg, esmtp=False)

    async def cmd_EHLO(self, arg):
        await self._helo(arg, esmtp=True)

    def _auth_offered(self) -> bool:
        return (self.s.users is not None and self.session.tls and not self.session.auth_user
                and (self.listener.kind == "submission" or self.s.auth_on_inbound))

    async def _helo(self, arg: str, esmtp: bool):
        name = arg.strip()
        if not name or " " in name:
            self.reply(501, f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname", "5.5.4")
            return await self._error()
        await self._reset()
        v = await self.pipeline.helo(self.session, name)
        if v is not None and v.action.refuses:
            self.reply_t(v.smtp_reply())
            return
        self.greeted = True
        self.esmtp = esmtp
        if not esmtp:
            self.reply(250, f"{self.s.hostname}")
            return
        lines = [f"{self.s.hostname}", "PIPELINING", f"SIZE {self.s.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.s.ssl_context is not None and not self.session.tls:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        if self.server.mode == "proxy" and self.s.xforward and \
                self.relay.in_mynetworks(self.session.peer_ip):
            lines.append("XFORWARD NAME ADDR PROTO HELO")
        lines.append("DSN")
        self.reply(250, "", lines=lines)

    async def cmd_STARTTLS(self, arg):
        if self.s.ssl_context is None or self.session.tls:
            self.reply(502 if self.s.ssl_context is None else 503,
                       "STARTTLS not available" if self.s.ssl_context is None else
                       "Already using TLS", "5.5.1")
            return await self._error()
        if arg.strip():
            self.reply(501, "Syntax: STARTTLS", "5.5.4")
            return
        self.reply(220, "Ready to start TLS", "2.0.0")
        await self.flush()
        self.input.buf.clear()  # anything sent ahead of the handshake is discarded (RFC 3207 4.2)
        try:
            await asyncio.wait_for(self.writer.start_tls(self.s.ssl_context),
                                   self.s.command_timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
            raise ClientGone(f"TLS handshake failed: {exc}") from None
        sslobj = self.writer.get_extra_info("ssl_object")
        self.session.tls = True
        if sslobj is not None:
            self.session.tls_version = sslobj.version() or ""
            self.session.tls_cipher = (sslobj.cipher() or ("",))[0]
        # RFC 3207: forget everything from before TLS, the client must EHLO again
        self.greeted = self.esmtp = False
        self.session.helo = ""
        await self._reset()

    async def cmd_AUTH(self, arg):
        if not self._auth_offered() and not self.session.auth_user:
            if self.s.users is not None and not self.session.tls and (
                    self.listener.kind == "submission" or self.s.auth_on_inbound):
                self.reply(538, "Encryption required for requested authentication mechanism",
                           "5.7.11")
            else:
                self.reply(502, "AUTH not available", "5.5.1")
            return await self._error()
        if self.session.auth_user:
            self.reply(503, "Already authenticated", "5.5.1")
            return
        if self.ctx is not None:
            self.reply(503, "AUTH not allowed during a mail transaction", "5.5.1")
            return
        mech, _, initial = arg.strip().partition(" ")
        mech = mech.upper()
        try:
            if mech == "PLAIN":
                resp = initial or await self._auth_challenge("")
                raw = base64.b64decode(resp, validate=True).decode("utf-8")
                parts = raw.split("\x00")
                if len(parts) != 3:
                    raise ValueError("bad PLAIN response")
                authzid, user, password = parts
                if authzid and authzid != user:
                    raise ValueError("authorization identity differs")
            elif mech == "LOGIN":
                u = initial or await self._auth_challenge(base64.b64encode(b"Username:").decode())
                user = base64.b64decode(u, validate=True).decode("utf-8")
                p = await self._auth_challenge(base64.b64encode(b"Password:").decode())
                password = base64.b64decode(p, validate=True).decode("utf-8")
            else:
                self.reply(504, "Unrecognized authentication mechanism", "5.5.4")
                return await self._error()
        except _AuthCancelled:
            self.reply(501, "Authentication cancelled", "5.7.0")
            return
        except (ValueError, binascii.Error, UnicodeDecodeError):
            self.reply(501, "Cannot decode the AUTH response", "5.5.2")
            return await self._error()
        ok = await asyncio.get_running_loop().run_in_executor(None, self.s.users.check,
                                                              user, password)
        if not ok:
            log.warning("AUTH failed for user %r from [%s]", user[:64], self.session.peer_ip)
            await asyncio.sleep(1.0)  # slow down guessing
            self.reply(535, "Authentication credentials invalid", "5.7.8")
            return await self._error()
        self.session.auth_user = user
        log.info("session %s [%s]: authenticated as %s", self.session.id,
                 self.session.peer_ip, user)
        self.reply(235, "Authentication successful", "2.7.0")

    async def _auth_challenge(self, text: str) -> str:
        self.reply(334, text)
        await self.flush()
        line = await self.input.readline(12288, self.s.command_timeout)
        line = line.rstrip(b"\r\n").decode("ascii", "replace")
        if line == "*":
            raise _AuthCancelled()
        return line

    async def cmd_XFORWARD(self, arg):
        if not (self.server.mode == "proxy" and self.s.xforward and
                self.relay.in_mynetworks(self.session.peer_ip)):
            self.reply(550, "XFORWARD not permitted", "5.7.0")
            return await self._error()
        if self.ctx is not None:
            self.reply(503, "XFORWARD not allowed during a mail transaction", "5.5.1")
            return
        for item in arg.split():
            k, _, v = item.partition("=")
            k = k.upper()
            if v.upper() in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                v = ""
            self.xforward[k] = v
            if k == "ADDR" and v:
                self.session.peer_ip = v[5:] if v.upper().startswith("IPV6:") else v
            elif k == "NAME":
                self.session.peer_name = v
            elif k == "HELO" and v:
                self.session.helo = v
        log.info("session %s: XFORWARD %s", self.session.id,
                 " ".join(f"{k}={v}" for k, v in self.xforward.items()))
        self.reply(250, "OK", "2.0.0")

    async def cmd_MAIL(self, arg):
        if not self.greeted:
            self.reply(503, "Send HELO/EHLO first", "5.5.1")
            return await self._error()
        if self.ctx is not None:
            self.reply(503, "Nested MAIL command", "5.5.1")
            return await self._error()
        if not arg[:5].upper() == "FROM:":
            self.reply(501, "Syntax: MAIL FROM:<address>", "5.5.4")
            return await self._error()
        if self.listener.kind == "submission" and not self.session.auth_user:
            self.reply(530, "Authentication required", "5.7.0")
            return await self._error()
        if self.s.require_tls and not self.session.tls and self.listener.kind == "smtp":
            self.reply(530, "Must issue a STARTTLS command first", "5.7.0")
            return await self._error()
        rest = arg[5:]
        smtputf8 = "SMTPUTF8" in rest.upper()
        try:
            path = parse_path(rest, smtputf8=smtputf8)
        except AddressError as exc:
            self.reply(501, str(exc), "5.1.7")
            return await self._error()
        params = path.params
        bad = self._check_mail_params(params)
        if bad:
            self.reply_t(bad)
            return await self._error()
        if params and not self.esmtp:
            self.reply(555, "ESMTP parameters require EHLO", "5.5.4")
            return await self._error()
        ctx = self.pipeline.begin(self.session)
        try:
            v = await self.pipeline.mail_from(ctx, path.address, params)
        except Exception:  # noqa: BLE001
            log.exception("mail_from hooks failed")
            self.reply(451, "Temporary local problem", "4.3.0")
            return
        if v is not None and v.action.refuses:
            self.reply_t(v.smtp_reply())
            return
        r = await self.backend.mail(ctx, path.address, params)
        if r is not None and r[0] >= 400:
            self.reply_t(r)
            return
        self.ctx = ctx
        self.reply(250, "OK", "2.1.0")

    def _check_mail_params(self, params: dict) -> tuple | None:
        for k, v in params.items():
            if k == "SIZE":
                if not v.isdigit():
                    return (501, "5.5.4", "Bad SIZE parameter")
                if int(v) > self.s.max_message_size:
                    return (552, "5.3.4", "Message size exceeds fixed limit")
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    return (555, "5.5.4", f"Unsupported BODY={v[:20]}")
            elif k == "SMTPUTF8":
                if v:
                    return (555, "5.5.4", "SMTPUTF8 takes no value")
            elif k == "RET":
                if v.upper() not in ("FULL", "HDRS"):
                    return (501, "5.5.4", "Bad RET parameter")
            elif k == "ENVID":
                pass
            elif k == "AUTH":
                pass  # RFC 4954 5: accepted, not trusted
            else:
                return (555, "5.5.4", f"Unsupported MAIL parameter {k[:20]}")
        return None

    async def cmd_RCPT(self, arg):
        if self.ctx is None:
            self.reply(503, "Need MAIL before RCPT", "5.5.1")
            return await self._error()
        if not arg[:3].upper() == "TO:":
            self.reply(501, "Syntax: RCPT TO:<address>", "5.5.4")
            return await self._error()
        if len(self.rcpts) >= self.s.max_recipients:
            self.reply(452, "Too many recipients", "4.5.3")
            return
        smtputf8 = "SMTPUTF8" in self.ctx.transaction.mail_params
        try:
            path = parse_path(arg[3:], smtputf8=smtputf8)
        except AddressError as exc:
            self.reply(501, str(exc), "5.1.3")
            return await self._error()
        if not path.address:
            self.reply(501, "Empty recipient address", "5.1.3")
            return await self._error()
        if path.address.lower() == "postmaster":
            path.address = self.relay.postmaster()
        for k, v in path.params.items():
            if k == "NOTIFY":
                vals = {x.upper() for x in v.split(",")}
                if not vals <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in vals and len(vals) > 1):
                    self.reply(501, "Bad NOTIFY parameter", "5.5.4")
                    return await self._error()
            elif k != "ORCPT":
                self.reply(555, f"Unsupported RCPT parameter {k[:20]}", "5.5.4")
                return await self._error()
        if self.server.mode != "proxy" or self.server.relay_in_proxy:
            rv = self.relay.check_recipient(path, self.session.peer_ip, self.session.auth_user)
            if rv is not None:
                log.info("session %s [%s]: RCPT <%s> refused: %s", self.session.id,
                         self.session.peer_ip, path.address, rv.reason)
                self.reply_t(rv.smtp_reply())
                return await self._error()
        try:
            v = await self.pipeline.rcpt_to(self.ctx, path.address, path.params)
        except Exception:  # noqa: BLE001
            log.exception("rcpt_to hooks failed")
            self.reply(451, "Temporary local problem", "4.3.0")
            return
        if v.action.refuses:
            self.reply_t(v.smtp_reply())
            return
        r = await self.backend.rcpt(path.address, path.params)
        if r is not None and r[0] >= 400:
            # the next hop refused: forget the recipient the pipeline added
            self.ctx.transaction.recipients = [
                x for x in self.ctx.transaction.recipients
                if x.address.lower() != path.address.lower()]
            self.reply_t(r)
            return
        if path.address.lower() not in (x.lower() for x in self.rcpts):
            self.rcpts.append(path.address)
            self.rcpt_params[path.address] = path.params
        self.reply(250, "OK", "2.1.5")

    async def cmd_BDAT(self, arg):
        self.reply(502, "BDAT (CHUNKING) not offered", "5.5.1")
        await self._error()

    async def cmd_DATA(self, arg):
        if self.ctx is None:
            self.reply(503, "Need MAIL command", "5.5.1")
            return await self._error()
        if not self.rcpts:
            self.reply(554, "No valid recipients", "5.5.1")
            return await self._error()
        if arg.strip():
            self.reply(501, "Syntax: DATA", "5.5.4")
            return
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        await self.flush()
        t0 = time.monotonic()
        content, size = await self.input.read_data(self.s.max_message_size,
                                                   self.s.data_timeout)
        try:
            reply = await self._end_of_data(content, size)
        finally:
            await self._reset()
        self.reply_t(reply)
        log.debug("session %s: DATA %d bytes in %.3fs -> %s", self.session.id, size,
                  time.monotonic() - t0, reply[0])

    async def _end_of_data(self, content: bytes | None, size: int) -> tuple:
        if content is None:
            log.info("session %s [%s]: message of %d bytes refused (limit %d)", self.session.id,
                     self.session.peer_ip, size, self.s.max_message_size)
            return (552, "5.3.4", "Message size exceeds fixed maximum message size")
        content = unstuff(content)
        content, problem = content_problem(content, self.s)
        if problem:
            log.info("session %s [%s]: message refused: %s", self.session.id,
                     self.session.peer_ip, problem[2])
            return problem
        if count_hops(content) > self.s.max_hops:
            return (554, "5.4.6", f"Too many hops (more than {self.s.max_hops} Received: "
                                  "headers): mail loop?")
        ctx = self.ctx
        if self.s.add_received and self.server.mode != "proxy":
            proto = "ESMTP" if self.esmtp else "SMTP"
            if self.esmtp:
                proto += ("S" if self.session.tls else "") + ("A" if self.session.auth_user else "")
            content = received_header(self.session, self.s.hostname, proto,
                                      ctx.transaction.id, self.rcpts) + content
        try:
            result = await self.pipeline.data(ctx, content)
        except Exception:  # noqa: BLE001
            log.exception("session %s: pipeline failed at end of DATA", self.session.id)
            return (451, "4.3.0", "Temporary local problem, try again later")
        disp = dispose(result)
        if disp.reply is not None:
            log.info("session %s id=%s: %s %s", self.session.id, ctx.transaction.id,
                     disp.reply[0], disp.reply[2])
            return disp.reply
        try:
            return await self.backend.end_of_data(ctx, result, disp, self.rcpt_params)
        except Exception:  # noqa: BLE001
            log.exception("session %s id=%s: hand-off failed", self.session.id,
                          ctx.transaction.id)
            return (451, "4.3.0", "Temporary local problem, try again later")


class _AuthCancelled(Exception):
    pass


@dataclass
class ListenerSpec:
    host: str
    port: int
    kind: str = "smtp"  # smtp | submission | proxy
    sock: socket.socket | None = None


def parse_hostport(value: str, default_port: int = 25) -> tuple[str, int]:
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif v.count(":") == 1:
        host, _, port = v.partition(":")
    else:
        host, port = v, str(default_port)
    if not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError(f"bad HOST:PORT {value!r}")
    return host or "0.0.0.0", int(port)


def make_socket(host: str, port: int, reuseport: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s


class SMTPServer:
    """Listeners + session accounting + reload/stop. The backend factory makes one backend per
    connection (see filterd.smtp.backends)."""

    def __init__(self, pipeline, settings: Settings, relay: RelayPolicy, backend_factory,
                 mode: str = "gateway"):
        self.pipeline = pipeline
        self.settings = settings
        self.relay = relay
        self.backend_factory = backend_factory
        self.mode = mode
        self.relay_in_proxy = False
        self.servers: list[asyncio.base_events.Server] = []
        self.sessions: set[asyncio.Task] = set()
        self.per_ip: dict[str, int] = {}
        self.accepting = True
        self.pipeline_users: dict[int, int] = {}  # id(pipeline) -> sessions using it
        self.keep_open = pipeline  # the first pipeline (the delivery core reports events to it)
        self.retired: list = []  # pipelines replaced by a reload, closed when their last
        #                          session ends

    async def swap_pipeline(self, pipeline, settings: Settings, relay: RelayPolicy) -> None:
        """SIGHUP: new sessions use the new pipeline; running ones finish on the old one, which
        is closed when its last session ends."""
        old = self.pipeline
        self.pipeline, self.settings, self.relay = pipeline, settings, relay
        if old is self.keep_open:
            return  # still used by the delivery core for its events; closed at shutdown
        if self.pipeline_users.get(id(old), 0) == 0:
            await self._close_pipeline(old)
        else:
            self.retired.append(old)

    async def _close_pipeline(self, pipe) -> None:
        if pipe in self.retired:
            self.retired.remove(pipe)
        try:
            await pipe.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the previous pipeline failed")

    async def start(self, listeners: list[ListenerSpec]) -> None:
        for spec in listeners:
            if spec.sock is None:
                spec.sock = make_socket(spec.host, spec.port)
            srv = await asyncio.start_server(
                lambda r, w, spec=spec: self._client(spec, r, w), sock=spec.sock,
                limit=2 ** 20)
            self.servers.append(srv)
            name = spec.sock.getsockname()
            log.info("listening for %s on %s:%s", spec.kind, name[0], name[1])

    async def _client(self, spec: ListenerSpec, reader, writer) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if not self.accepting or len(self.sessions) >= self.settings.max_sessions:
            writer.write(b"421 4.7.0 Too many connections, try again later\r\n")
            await _close(writer)
            return
        if self.per_ip.get(peer, 0) >= self.settings.max_sessions_per_ip:
            writer.write(b"421 4.7.0 Too many connections from your address\r\n")
            await _close(writer)
            return
        self.per_ip[peer] = self.per_ip.get(peer, 0) + 1
        task = asyncio.current_task()
        self.sessions.add(task)
        pipe = self.pipeline
        self.pipeline_users[id(pipe)] = self.pipeline_users.get(id(pipe), 0) + 1
        try:
            await SMTPConnection(self, spec, reader, writer).run()
        finally:
            self.sessions.discard(task)
            left = self.pipeline_users.get(id(pipe), 1) - 1
            if left <= 0:
                self.pipeline_users.pop(id(pipe), None)
                if pipe is not self.pipeline and pipe in self.retired:
                    await self._close_pipeline(pipe)
            else:
                self.pipeline_users[id(pipe)] = left
            n = self.per_ip.get(peer, 1) - 1
            if n <= 0:
                self.per_ip.pop(peer, None)
            else:
                self.per_ip[peer] = n

    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for srv in self.servers:
            for s in srv.sockets:
                out.append(s.getsockname()[:2])
        return out

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let running sessions finish for up to ``grace`` seconds."""
        self.accepting = False
        for srv in self.servers:
            srv.close()
        if self.sessions:
            log.info("waiting up to %.0fs for %d session(s) to finish", grace, len(self.sessions))
            done, pending = await asyncio.wait(list(self.sessions), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for srv in self.servers:
            try:
                await asyncio.wait_for(srv.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        for pipe in list(self.retired):
            await self._close_pipeline(pipe)


async def _close(writer) -> None:
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except Exception:  # noqa: BLE001
        pass
