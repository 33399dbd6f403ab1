"""Outbound SMTP and LMTP client (asyncio streams).

Our own small client rather than aiosmtplib because delivery needs three things at once that a
general client does not give: LMTP (one reply per recipient after the data, RFC 2033), command
pipelining (RFC 2920: MAIL, every RCPT and DATA in one write, which matters for throughput on
reused connections) and the exact reply of each recipient for DSNs.

A :class:`Connection` is opened with opportunistic STARTTLS (policy "may"), required TLS
("encrypt") or none, and can send many messages in a row (connection reuse through
:class:`ConnectionPool`).
"""
from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass, field


@dataclass
class Reply:
    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()

    @property
    def kind(self) -> str:
        if 200 <= self.code < 400:
            return "ok"
        if 400 <= self.code < 500 or self.code == 0:
            return "temp"
        return "perm"

    @property
    def enhanced(self) -> str:
        m = re.match(r"^([245])\.(\d{1,3})\.(\d{1,3})\b", self.lines[0] if self.lines else "")
        return m.group(0) if m else ""


class ConnectError(Exception):
    """Could not get a usable session with this host (connect, greeting, EHLO, TLS policy).
    ``permanent`` when the host refused us with a 5xx greeting."""

    def __init__(self, message: str, permanent: bool = False, reply: Reply | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.reply = reply


class ConnectionLost(Exception):
    """The session broke in the middle of a transaction (EOF, timeout, protocol error)."""


def prepare_data(data: bytes) -> bytes:
    """CRLF line ends, dot-stuffing (RFC 5321 4.5.2), final CRLF and the terminating dot."""
    if data.count(b"\n") != data.count(b"\r\n"):
        data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


_TLS_CONTEXTS: dict[bool, ssl.SSLContext] = {}


def tls_context(verify: bool) -> ssl.SSLContext:
    """Client TLS contexts, built once (loading the CA store per connection is costly).
    Unverified for opportunistic TLS (RFC 7435: encryption against passive listeners)."""
    ctx = _TLS_CONTEXTS.get(verify)
    if ctx is None:
        if verify:
            ctx = ssl.create_default_context()
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXTS[verify] = ctx
    return ctx


class Connection:
    def __init__(self, host: str, address: str, port: int, *, lmtp: bool = False,
                 helo: str = "localhost", connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, data_timeout: float = 600.0,
                 unix_path: str = ""):
        self.host = host
        self.address = address
        self.port = port
        self.lmtp = lmtp
        self.helo = helo
        self.unix_path = unix_path
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.ext: dict[str, str] = {}
        self.tls = False
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.messages = 0
        self.last_used = time.monotonic()
        self.broken = False
        self.tx_replies = 0  # replies received in the current transaction

    @property
    def peer(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"{self.host}[{self.address}]:{self.port}"

    # -- low level ----------------------------------------------------------------------------
    async def read_reply(self, timeout: float | None = None) -> Reply:
        lines: list[str] = []
        code = 0
        assert self.reader is not None
        while True:
            try:
                async with asyncio.timeout(timeout or self.command_timeout):
                    raw = await self.reader.readline()
            except TimeoutError:
                self.broken = True
                raise ConnectionLost(f"timeout waiting for a reply from {self.peer}") from None
            except (ConnectionError, OSError, ValueError) as exc:
                self.broken = True
                raise ConnectionLost(f"lost connection with {self.peer}: {exc}") from None
            if not raw:
                self.broken = True
                raise ConnectionLost(f"{self.peer} closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit():
                self.broken = True
                raise ConnectionLost(f"{self.peer} sent a malformed reply: {line[:100]!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                self.tx_replies += 1
                if code == 421:  # the server is closing the session (RFC 5321 3.8)
                    self.broken = True
                return Reply(code, lines)

    async def write(self, data: bytes) -> None:
        assert self.writer is not None
        try:
            self.writer.write(data)
            async with asyncio.timeout(self.data_timeout):
                await self.writer.drain()
        except TimeoutError:
            self.broken = True
            raise ConnectionLost(f"timeout sending to {self.peer}") from None
        except (ConnectionError, OSError) as exc:
            self.broken = True
            raise ConnectionLost(f"lost connection with {self.peer}: {exc}") from None

    async def command(self, line: str) -> Reply:
        await self.write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    # -- session ------------------------------------------------------------------------------
    async def open(self, tls: str = "may", tls_verify: bool = False, domain: str = "") -> None:
        """Connect, read the greeting, EHLO/LHLO, STARTTLS per policy. Raises ConnectError."""
        try:
            if self.unix_path:
                coro = asyncio.open_unix_connection(self.unix_path)
            else:
                coro = asyncio.open_connection(self.address, self.port)
            self.reader, self.writer = await asyncio.wait_for(coro, self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectError(f"connect to {self.peer}: timed out") from None
        except OSError as exc:
            raise ConnectError(f"connect to {self.peer}: {exc.strerror or exc}") from None
        try:
            greet = await self.read_reply()
            if greet.code != 220:
                self.close()
                raise ConnectError(f"{self.peer} greeted with {greet}",
                                   permanent=greet.kind == "perm", reply=greet)
            await self._hello()
            if tls != "none" and "STARTTLS" in self.ext and not self.unix_path:
                r = await self.command("STARTTLS")
                if r.code == 220:
                    ctx = tls_context(tls_verify)
                    try:
                        await asyncio.wait_for(self.writer.start_tls(
                            ctx, server_hostname=self.host if tls_verify else None),
                            self.connect_timeout)
                    except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
                        self.close()
                        raise ConnectError(f"TLS handshake with {self.peer} failed: {exc}",
                                           reply=Reply(0, ["tls-failed"])) from None
                    self.tls = True
                    await self._hello()
                elif tls == "encrypt":
                    self.close()
                    raise ConnectError(f"{self.peer} refused STARTTLS ({r}) and TLS is "
                                       f"required for {domain or self.host}")
            elif tls == "encrypt":
                self.close()
                raise ConnectError(f"TLS is required for {domain or self.host} but "
                                   f"{self.peer} does not offer STARTTLS")
        except ConnectionLost as exc:
            self.close()
            raise ConnectError(str(exc)) from None

    async def _hello(self) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        r = await self.command(f"{verb} {self.helo}")
        if r.code != 250 and not self.lmtp:
            r2 = await self.command(f"HELO {self.helo}")
            if r2.code != 250:
                self.close()
                raise ConnectError(f"{self.peer} refused EHLO and HELO: {r2}",
                                   permanent=r2.kind == "perm", reply=r2)
            self.ext = {}
            return
        if r.code != 250:
            self.close()
            raise ConnectError(f"{self.peer} refused {verb}: {r}", reply=r)
        self.ext = {}
        for line in r.lines[1:]:
            kw, _, arg = line.strip().partition(" ")
            if kw:
                self.ext[kw.upper()] = arg

    async def send(self, mail_from: str, rcpts: list[str], data: bytes,
                   mail_params: dict | None = None,
                   rcpt_params: dict | None = None) -> dict[str, Reply]:
        """One transaction. Returns the final reply per recipient (the RCPT refusal, or the
        reply after the data). Raises ConnectionLost if the session broke midway."""
        mail_params = mail_params or {}
        rcpt_params = rcpt_params or {}
        self.tx_replies = 0
        self.last_used = time.monotonic()
        params = []
        if "SIZE" in self.ext:
            params.append(f"SIZE={len(data)}")
        body = str(mail_params.get("BODY", "")).upper()
        if body in ("8BITMIME", "BINARYMIME") and "8BITMIME" in self.ext:
            params.append("BODY=8BITMIME")
        if "SMTPUTF8" in {k.upper() for k in mail_params}:
            if "SMTPUTF8" in self.ext:
                params.append("SMTPUTF8")
            elif not (mail_from + "".join(rcpts)).isascii():
                # RFC 6531 3.2: an internationalized address cannot go to a server without
                # SMTPUTF8 (nothing was sent; the session stays usable)
                rep = Reply(553, [f"5.6.7 {self.peer} does not support SMTPUTF8, needed for "
                                  f"a non-ASCII address"])
                return {r: rep for r in rcpts}
        dsn = "DSN" in self.ext
        if dsn:
            for k in ("RET", "ENVID"):
                v = mail_params.get(k)
                if v:
                    params.append(f"{k}={v}")
        cmds = [f"MAIL FROM:<{mail_from}>" + "".join(" " + p for p in params)]
        for r in rcpts:
            extra = ""
            if dsn:
                for k in ("NOTIFY", "ORCPT"):
                    v = (rcpt_params.get(r) or {}).get(k)
                    if v:
                        extra += f" {k}={v}"
            cmds.append(f"RCPT TO:<{r}>{extra}")
        cmds.append("DATA")
        replies: list[Reply] = []
        if "PIPELINING" in self.ext:
            await self.write("".join(c + "\r\n" for c in cmds).encode("utf-8"))
            for _ in cmds:
                replies.append(await self.read_reply())
        else:
            for i, c in enumerate(cmds):
                rep = await self.command(c)
                replies.append(rep)
                if i == 0 and rep.kind != "ok":
                    break
            if len(replies) == 1:  # MAIL refused: no RCPT/DATA sent
                replies += [replies[0]] * len(rcpts) + [Reply(503, ["5.5.1 not sent"])]
            elif not any(rep.kind == "ok" for rep in replies[1:-1]) and replies[-1].code == 354:
                pass
        mail_rep, rcpt_reps, data_rep = replies[0], replies[1:-1], replies[-1]
        result: dict[str, Reply] = {}
        accepted: list[str] = []
        for r, rep in zip(rcpts, rcpt_reps):
            if mail_rep.kind != "ok":
                result[r] = mail_rep
            elif rep.kind != "ok":
                result[r] = rep
            else:
                accepted.append(r)
        if data_rep.code == 354:
            if not accepted:  # a server that said 354 anyway: send an empty message's end
                await self.write(b".\r\n")
                await self.read_reply(self.data_timeout)
            else:
                await self.write(prepare_data(data))
                if self.lmtp:
                    for r in accepted:
                        result[r] = await self.read_reply(self.data_timeout)
                else:
                    rep = await self.read_reply(self.data_timeout)
                    for r in accepted:
                        result[r] = rep
                self.messages += 1
        else:
            for r in accepted:
                result[r] = data_rep
            await self.reset()
        self.last_used = time.monotonic()
        return result

    async def reset(self) -> None:
        try:
            rep = await self.command("RSET")
            if rep.code != 250:
                self.broken = True
        except ConnectionLost:
            self.broken = True

    async def quit(self) -> None:
        if self.writer is None:
            return
        if not self.broken:
            try:
                await asyncio.wait_for(self.command("QUIT"), 5)
            except (ConnectionLost, asyncio.TimeoutError):
                pass
        self.close()

    def close(self) -> None:
        self.broken = True
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001 - closing a broken transport
                pass


class ConnectionPool:
    """Idle connections per destination for reuse, and a connection limit per destination."""

    def __init__(self, max_per_destination: int = 20, idle_timeout: float = 5.0,
                 max_messages: int = 1000):
        self.max_per_destination = max_per_destination
        self.idle_timeout = idle_timeout
        self.max_messages = max_messages
        self.idle: dict[tuple, list[Connection]] = {}
        self.limits: dict[tuple, asyncio.Semaphore] = {}
        self.opened = 0  # connections opened (for tests and stats)

    def limit(self, key: tuple) -> asyncio.Semaphore:
        sem = self.limits.get(key)
        if sem is None:
            sem = self.limits[key] = asyncio.Semaphore(self.max_per_destination)
        return sem

    def take_idle(self, key: tuple) -> Connection | None:
        conns = self.idle.get(key)
        now = time.monotonic()
        while conns:
            c = conns.pop()
            if not c.broken and now - c.last_used < self.idle_timeout \
                    and c.reader is not None and not c.reader.at_eof():
                return c
            asyncio.ensure_future(c.quit())
        return None

    def put(self, key: tuple, conn: Connection) -> None:
        if conn.broken or conn.messages >= self.max_messages:
            asyncio.ensure_future(conn.quit())
            return
        conn.last_used = time.monotonic()
        self.idle.setdefault(key, []).append(conn)

    async def reap(self) -> None:
        now = time.monotonic()
        for key, conns in list(self.idle.items()):
            keep = []
            for c in conns:
                if now - c.last_used >= self.idle_timeout or c.broken:
                    await c.quit()
                else:
                    keep.append(c)
            self.idle[key] = keep

    async def close(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                await c.quit()
        self.idle.clear()
