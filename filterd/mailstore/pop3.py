"""A POP3 server for the mailstore (RFC 1939, CAPA from RFC 2449, STLS from RFC 2595, SASL
PLAIN from RFC 5034), asyncio.

- Passwords only over TLS (STLS or the implicit-TLS listener), or from loopback when
  ``[pop3] allow_plaintext_loopback`` is on. Users are the SMTP AUTH users file.
- Failed logins are slowed down (``failure_delay`` per recent failure) and locked out
  (``max_failures`` within ``failure_window`` → ``lockout``) per user and per client address.
- The maildrop is locked exclusively for a session (RFC 1939); a second session gets
  ``-ERR [IN-USE]``. Messages marked with DELE are removed only at QUIT; a dropped connection
  removes nothing. UIDL is the Maildir file's unique name, stable across sessions.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import ipaddress
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("filterd.pop3")

MAX_LINE = 1024


@dataclass
class Msg:
    path: Path
    uid: str
    size: int
    deleted: bool = False


def _uid(path: Path) -> str:
    return path.name.split(":", 1)[0]


def _wire(data: bytes) -> bytes:
    """CRLF line endings, as POP3 transmits and counts sizes."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _stuff(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    out = [b"." + ln if ln.startswith(b".") else ln for ln in lines]
    body = b"\r\n".join(out)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


@dataclass
class Guard:
    """Login failure counting per user and per client address."""

    max_failures: int = 5
    window: float = 900.0
    lockout: float = 900.0
    delay: float = 1.0
    failures: dict[str, list[float]] = field(default_factory=dict)
    locked: dict[str, float] = field(default_factory=dict)

    def is_locked(self, *keys: str) -> bool:
        now = time.monotonic()
        return any(self.locked.get(k, 0) > now for k in keys)

    def fail(self, *keys: str) -> float:
        now = time.monotonic()
        worst = 0
        for k in keys:
            recent = [t for t in self.failures.get(k, []) if now - t < self.window] + [now]
            self.failures[k] = recent
            worst = max(worst, len(recent))
            if len(recent) >= self.max_failures:
                self.locked[k] = now + self.lockout
                log.warning("pop3: %s locked out for %.0fs after %d failed logins", k,
                            self.lockout, len(recent))
        return min(self.delay * worst, 10.0)

    def success(self, *keys: str) -> None:
        for k in keys:
            self.failures.pop(k, None)


class POP3Session:
    def __init__(self, server: "POP3Server", reader, writer, tls: bool):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.tls = tls
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = peer[0]
        self.user: str | None = None
        self.pending_user: str | None = None
        self.msgs: list[Msg] = []
        self.lock_fd: int | None = None

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.peer.split("%")[0]).is_loopback
        except ValueError:
            return False

    @property
    def may_login(self) -> bool:
        return self.tls or (self.server.allow_plaintext_loopback and self.loopback)

    async def send(self, line: str | bytes) -> None:
        data = line if isinstance(line, bytes) else (line + "\r\n").encode()
        self.writer.write(data)
        await self.writer.drain()

    async def run(self) -> None:
        try:
            await self.send(f"+OK {self.server.hostname} filterd POP3 ready")
            while True:
                try:
                    line = await asyncio.wait_for(self.reader.readuntil(b"\n"),
                                                  self.server.idle_timeout)
                except asyncio.LimitOverrunError:
                    await self.send("-ERR line too long")
                    return
                except asyncio.IncompleteReadError:
                    return  # dropped connection: nothing deleted
                except asyncio.TimeoutError:
                    await self.send("-ERR autologout; idle for too long")
                    return
                if len(line) > MAX_LINE:
                    await self.send("-ERR line too long")
                    continue
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                cmd, _, arg = text.partition(" ")
                handler = getattr(self, f"cmd_{cmd.upper()}", None)
                if handler is None or not cmd.isalpha():
                    await self.send("-ERR unknown command")
                    continue
                if await handler(arg.strip()) is False:
                    return
        except (ConnectionError, ssl.SSLError) as exc:
            log.info("pop3 %s: connection ended: %s", self.peer, exc)
        finally:
            self.unlock()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass

    # -- authorization state ------------------------------------------------------------------
    async def cmd_CAPA(self, arg):
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "IMPLEMENTATION filterd"]
        if self.user is None:
            if self.server.ssl_context is not None and not self.tls:
                caps.append("STLS")
            if self.may_login:
                caps += ["USER", "SASL PLAIN"]
        await self.send("+OK capability list follows\r\n" + "\r\n".join(caps) + "\r\n.")

    async def cmd_STLS(self, arg):
        if self.tls or self.server.ssl_context is None or self.user is not None:
            await self.send("-ERR STLS not available now")
            return
        await self.send("+OK begin TLS negotiation")
        await self.writer.start_tls(self.server.ssl_context)
        self.tls = True

    async def cmd_USER(self, arg):
        if self.user is not None:
            return await self.send("-ERR already logged in")
        if not self.may_login:
            return await self.send("-ERR [AUTH] use STLS first: no passwords in clear text")
        self.pending_user = arg
        await self.send("+OK send PASS")

    async def cmd_PASS(self, arg):
        if self.user is not None or self.pending_user is None:
            return await self.send("-ERR USER first")
        user, self.pending_user = self.pending_user, None
        return await self.login(user, arg)

    async def cmd_AUTH(self, arg):
        if self.user is not None:
            return await self.send("-ERR already logged in")
        mech, _, initial = arg.partition(" ")
        if mech.upper() != "PLAIN":
            return await self.send("-ERR [AUTH] only SASL PLAIN is supported")
        if not self.may_login:
            return await self.send("-ERR [AUTH] use STLS first: no passwords in clear text")
        if not initial:
            await self.send("+ ")
            initial = (await self.reader.readline()).decode("ascii", "replace").strip()
            if initial == "*":
                return await self.send("-ERR authentication cancelled")
        try:
            _authz, user, pw = base64.b64decode(initial, validate=True).decode().split("\0")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return await self.send("-ERR [AUTH] malformed SASL PLAIN response")
        return await self.login(user, pw)

    async def login(self, user: str, password: str):
        keys = (f"user:{user.lower()}", f"ip:{self.peer}")
        guard = self.server.guard
        if guard.is_locked(*keys):
            await asyncio.sleep(guard.delay)
            return await self.send("-ERR [AUTH] too many failed logins; try again later")
        ok = await asyncio.to_thread(self.server.check_password, user, password)
        if not ok:
            delay = guard.fail(*keys)
            log.warning("pop3 %s: failed login for %r", self.peer, user)
            await asyncio.sleep(delay)
            return await self.send("-ERR [AUTH] invalid user name or password")
        guard.success(*keys)
        if not self.lock(user):
            return await self.send("-ERR [IN-USE] maildrop is locked by another session")
        self.user = user
        self.load()
        log.info("pop3 %s: %s logged in, %d messages", self.peer, user, len(self.msgs))
        await self.send(f"+OK {len(self.msgs)} messages")

    async def cmd_APOP(self, arg):
        await self.send("-ERR APOP is not supported; use USER/PASS or AUTH PLAIN over TLS")

    async def cmd_QUIT(self, arg):
        if self.user is not None:  # UPDATE state: now, and only now, remove DELE'd messages
            removed = 0
            for m in self.msgs:
                if m.deleted:
                    try:
                        m.path.unlink()
                        removed += 1
                    except FileNotFoundError:
                        pass
            await self.send(f"+OK {removed} messages deleted; bye")
        else:
            await self.send("+OK bye")
        return False

    # -- transaction state --------------------------------------------------------------------
    def lock(self, user: str) -> bool:
        md = self.server.store.ensure(user)
        fd = os.open(md / ".pop3.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.lock_fd = fd
        return True

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def load(self) -> None:
        md = self.server.store.maildir(self.user)
        files = []
        for sub in ("cur", "new"):
            d = md / sub
            if d.is_dir():
                files += [p for p in d.iterdir() if p.is_file()]
        files.sort(key=lambda p: (p.stat().st_mtime, p.name))
        self.msgs = []
        for p in files:
            try:
                self.msgs.append(Msg(p, _uid(p), len(_wire(p.read_bytes()))))
            except FileNotFoundError:
                continue

    def _need_login(self) -> bool:
        return self.user is None

    def _msg(self, arg: str) -> Msg | str:
        try:
            n = int(arg)
        except ValueError:
            return "-ERR expected a message number"
        if n < 1 or n > len(self.msgs) or self.msgs[n - 1].deleted:
            return "-ERR no such message"
        return self.msgs[n - 1]

    async def _guarded(self, arg, fn):
        if self._need_login():
            return await self.send("-ERR log in first")
        return await fn(arg)

    async def cmd_STAT(self, arg):
        async def f(_):
            live = [m for m in self.msgs if not m.deleted]
            await self.send(f"+OK {len(live)} {sum(m.size for m in live)}")
        return await self._guarded(arg, f)

    async def cmd_LIST(self, arg):
        async def f(arg):
            if arg:
                m = self._msg(arg)
                return await self.send(m if isinstance(m, str) else f"+OK {arg} {m.size}")
            lines = [f"{i} {m.size}" for i, m in enumerate(self.msgs, 1) if not m.deleted]
            await self.send("\r\n".join(["+OK scan listing follows", *lines, "."]))
        return await self._guarded(arg, f)

    async def cmd_UIDL(self, arg):
        async def f(arg):
            if arg:
                m = self._msg(arg)
                return await self.send(m if isinstance(m, str) else f"+OK {arg} {m.uid}")
            lines = [f"{i} {m.uid}" for i, m in enumerate(self.msgs, 1) if not m.deleted]
            await self.send("\r\n".join(["+OK unique-id listing follows", *lines, "."]))
        return await self._guarded(arg, f)

    async def cmd_RETR(self, arg):
        async def f(arg):
            m = self._msg(arg)
            if isinstance(m, str):
                return await self.send(m)
            try:
                data = _wire(m.path.read_bytes())
            except FileNotFoundError:
                return await self.send("-ERR message was removed by another client")
            await self.send(f"+OK {len(data)} octets")
            await self.send(_stuff(data))
        return await self._guarded(arg, f)

    async def cmd_TOP(self, arg):
        async def f(arg):
            parts = arg.split()
            if len(parts) != 2 or not parts[1].isdigit():
                return await self.send("-ERR usage: TOP msg lines")
            m = self._msg(parts[0])
            if isinstance(m, str):
                return await self.send(m)
            data = _wire(m.path.read_bytes())
            head, sep, body = data.partition(b"\r\n\r\n")
            lines = body.split(b"\r\n")[: int(parts[1])] if sep else []
            out = head + b"\r\n\r\n" + b"\r\n".join(lines) if sep else head
            await self.send("+OK top of message follows")
            await self.send(_stuff(out))
        return await self._guarded(arg, f)

    async def cmd_DELE(self, arg):
        async def f(arg):
            m = self._msg(arg)
            if isinstance(m, str):
                return await self.send(m)
            m.deleted = True
            await self.send(f"+OK message {arg} marked for deletion")
        return await self._guarded(arg, f)

    async def cmd_RSET(self, arg):
        async def f(_):
            for m in self.msgs:
                m.deleted = False
            await self.send(f"+OK {len(self.msgs)} messages")
        return await self._guarded(arg, f)

    async def cmd_NOOP(self, arg):
        return await self._guarded(arg, lambda _: self.send("+OK"))


class POP3Server:
    def __init__(self, store, userdb, hostname: str = "localhost",
                 ssl_context: ssl.SSLContext | None = None, allow_plaintext_loopback: bool = True,
                 guard: Guard | None = None, idle_timeout: float = 600.0):
        self.store = store
        self.userdb = userdb
        self.hostname = hostname
        self.ssl_context = ssl_context
        self.allow_plaintext_loopback = allow_plaintext_loopback
        self.guard = guard or Guard()
        self.idle_timeout = idle_timeout
        self.servers: list[asyncio.AbstractServer] = []
        self.sessions: set[asyncio.Task] = set()

    def check_password(self, user: str, password: str) -> bool:
        return self.userdb is not None and self.userdb.check(user, password)

    async def _client(self, reader, writer, tls: bool) -> None:
        task = asyncio.current_task()
        self.sessions.add(task)
        try:
            await POP3Session(self, reader, writer, tls).run()
        finally:
            self.sessions.discard(task)

    async def listen(self, host: str, port: int, implicit_tls: bool = False):
        ctx = self.ssl_context if implicit_tls else None
        if implicit_tls and ctx is None:
            raise ValueError("[pop3] listen_tls needs tls_cert and tls_key")
        srv = await asyncio.start_server(
            lambda r, w: self._client(r, w, implicit_tls), host, port, ssl=ctx,
            limit=MAX_LINE * 4)
        self.servers.append(srv)
        return srv

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in list(self.sessions):
            t.cancel()
        for s in self.servers:
            await s.wait_closed()


def from_config(config, store=None):
    """Build the POP3 server from ``[pop3]`` (users from ``[smtp] users_file``)."""
    from ..config import parse_duration
    from ..smtp.auth import UserDB
    from . import MailStore

    section = config.section("pop3")
    users_file = config.get("smtp.users_file") or ""
    userdb = UserDB(users_file) if users_file else None
    if userdb is None:
        log.warning("pop3: no [smtp] users_file: nobody can log in")
    cert = section.get("tls_cert") or config.get("smtp.tls_cert") or ""
    key = section.get("tls_key") or config.get("smtp.tls_key") or ""
    ctx = None
    if cert and key:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
    guard = Guard(int(section.get("max_failures", 5)),
                  parse_duration(section.get("failure_window", "15m")),
                  parse_duration(section.get("lockout", "15m")),
                  parse_duration(section.get("failure_delay", "1s")))
    hostname = config.get("server.hostname") or os.uname().nodename
    return POP3Server(store or MailStore.from_config(config), userdb, hostname, ctx,
                      bool(section.get("allow_plaintext_loopback", True)), guard,
                      parse_duration(section.get("idle_timeout", "10m")))
