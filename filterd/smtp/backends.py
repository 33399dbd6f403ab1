"""What accepting a message means, per mode.

- :class:`GatewayBackend` (gateway mode, also Postfix's after-queue content_filter): the message
  goes to the durable spool (``Spool.enqueue`` returns only after fsync), the delivery core is
  notified, and only then does the client get 250.
- :class:`ProxyBackend` (Postfix ``smtpd_proxy_filter``): MAIL and RCPT are forwarded to the next
  hop as they arrive and its replies relayed; at the end of DATA the scanned message is sent to
  the next hop and *its* reply becomes ours. Nothing is stored, except quarantined recipients
  when no quarantine service is registered (they go to the spool's hold area).

Per-recipient outcomes (see :func:`filterd.smtp.server.dispose` and docs/smtp.md):
deliver → queued/forwarded; quarantine → ``services.extra["quarantine"].hold(...)`` if
registered, else spooled with ``hold=True`` (``filterd queue release`` delivers them);
discard → dropped and logged; reject in a mixed message → dropped without DSN, logged and
reported with the ``bounced`` event (permanent=True).
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("filterd.smtp")


def _envelope_cls():
    from ..queue.spool import Envelope
    return Envelope


def _meta(conn, result) -> dict:
    s = conn.session
    return {
        "client_ip": s.peer_ip, "client_name": s.peer_name, "helo": s.helo,
        "auth_user": s.auth_user, "tls": s.tls, "session": s.id,
        "transaction": result.ctx.transaction.id, "score": result.score,
        "symbols": [x.name for x in result.symbols], "front_door": s.front_door,
    }


async def _dropped_and_discarded(conn, ctx, result, disp) -> None:
    pipe = conn.pipeline
    for addr, v in disp.dropped.items():
        code, enh, text = v.smtp_reply()
        log.info("id=%s <%s>: rejected recipient of an accepted message dropped without DSN "
                 "(%s %s %s)", ctx.transaction.id, addr, code, enh, text)
        try:
            await pipe.bounced(ctx, addr, f"{code} {enh} {text}", True)
        except Exception:  # noqa: BLE001
            log.exception("bounced event failed")
    for addr in disp.discard:
        o = result.outcomes.get(addr)
        log.info("id=%s <%s>: discarded (%s)", ctx.transaction.id, addr,
                 o.verdict.reason if o else "")


async def _hold(conn, spool, ctx, result, disp, data: bytes, mail_params, rcpt_params) -> None:
    """Quarantine seam: a registered quarantine service, else the spool's hold area."""
    if not disp.hold:
        return
    q = conn.pipeline.services.extra.get("quarantine")
    if q is not None:
        await q.hold(ctx, result, list(disp.hold))
    else:
        if spool is None:
            raise RuntimeError("quarantine requested but neither a quarantine service nor a "
                               "spool is configured")
        Envelope = _envelope_cls()
        env = Envelope(mail_from=ctx.transaction.mail_from, recipients=list(disp.hold),
                       received_at=time.time(), meta=_meta(conn, result), hold=True,
                       mail_params=dict(mail_params),
                       rcpt_params={a: dict(rcpt_params.get(a, {})) for a in disp.hold})
        qid = await spool.enqueue(env, data)
        log.info("id=%s held as %s for %s", ctx.transaction.id, qid, ",".join(disp.hold))
    for addr in disp.hold:
        o = result.outcomes.get(addr)
        try:
            await conn.pipeline.quarantined(ctx, addr, o.verdict.reason if o else "")
        except Exception:  # noqa: BLE001
            log.exception("quarantined event failed")


class GatewayBackend:
    def __init__(self, conn, spool, delivery):
        self.conn = conn
        self.spool = spool
        self.delivery = delivery

    async def mail(self, ctx, sender, params):
        return None

    async def rcpt(self, address, params):
        return None

    async def rset(self):
        return None

    async def close(self):
        return None

    async def end_of_data(self, ctx, result, disp, rcpt_params) -> tuple:
        data = result.message_bytes()
        mail_params = ctx.transaction.mail_params
        qid = ""
        if disp.deliver:
            Envelope = _envelope_cls()
            env = Envelope(mail_from=ctx.transaction.mail_from, recipients=list(disp.deliver),
                           received_at=time.time(), meta=_meta(self.conn, result),
                           mail_params=dict(mail_params),
                           rcpt_params={a: dict(rcpt_params.get(a, {})) for a in disp.deliver})
            qid = await self.spool.enqueue(env, data)
            if self.delivery is not None:
                self.delivery.notify(qid)
        await _hold(self.conn, self.spool, ctx, result, disp, data, mail_params, rcpt_params)
        await _dropped_and_discarded(self.conn, ctx, result, disp)
        log.info("id=%s from=<%s> queued=%s deliver=%s hold=%s discard=%s dropped=%s",
                 ctx.transaction.id, ctx.transaction.mail_from, qid or "-",
                 ",".join(disp.deliver) or "-", ",".join(disp.hold) or "-",
                 ",".join(disp.discard) or "-", ",".join(disp.dropped) or "-")
        return (250, "2.0.0", f"Ok: queued as {qid or ctx.transaction.id}")


class NextHopError(Exception):
    pass


class NextHop:
    """A minimal SMTP client for the proxy: one connection per client session, replies parsed
    exactly so they can be relayed."""

    def __init__(self, host: str, port: int, timeout: float, helo: str):
        self.host, self.port, self.timeout, self.helo = host, port, timeout, helo
        self.reader = self.writer = None
        self.features: set[str] = set()

    async def connect(self) -> None:
        try:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise NextHopError(f"cannot connect to next hop {self.host}:{self.port}: {exc}")
        code, lines = await self.read_reply()
        if code != 220:
            raise NextHopError(f"next hop {self.host}:{self.port} greeted with {code} {lines}")
        code, lines = await self.command(f"EHLO {self.helo}")
        if code != 250:
            raise NextHopError(f"next hop refused EHLO: {code} {lines}")
        self.features = {ln.split()[0].upper() for ln in lines[1:] if ln.split()}
        self.xforward_attrs = set()
        for ln in lines[1:]:
            if ln.upper().startswith("XFORWARD"):
                self.xforward_attrs = {x.upper() for x in ln.split()[1:]}

    async def read_reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            try:
                line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except (OSError, asyncio.TimeoutError, ValueError) as exc:
                raise NextHopError(f"next hop {self.host}:{self.port} did not answer: {exc!r}")
            if not line:
                raise NextHopError(f"next hop {self.host}:{self.port} closed the connection")
            s = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(s) < 3 or not s[:3].isdigit():
                raise NextHopError(f"next hop sent a malformed reply {s[:80]!r}")
            lines.append(s[4:])
            if len(s) == 3 or s[3] == " ":
                return int(s[:3]), lines

    async def command(self, cmd: str) -> tuple[int, list[str]]:
        self.writer.write(cmd.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def send_data(self, data: bytes) -> tuple[int, list[str]]:
        self.data_sent = False
        code, lines = await self.command("DATA")
        if code != 354:
            return code, lines
        self.data_sent = True
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        if data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self.writer.write(data + b".\r\n")
        return await self.read_reply()

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.writer.drain(), 2)
            self.writer.close()
        except Exception:  # noqa: BLE001
            pass
        self.writer = None


def _as_reply(code: int, lines: list[str]) -> tuple:
    text = " ".join(lines) if lines else ""
    parts = text.split(" ", 1)
    if parts and len(parts[0].split(".")) == 3 and parts[0][0].isdigit():
        return code, parts[0], (parts[1] if len(parts) > 1 else "")
    enh = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "5.0.0")
    return code, enh, text


def _mail_cmd(sender: str, params: dict) -> str:
    ps = "".join(f" {k}={v}" if v else f" {k}" for k, v in params.items())
    return f"MAIL FROM:<{sender}>{ps}"


def _rcpt_cmd(addr: str, params: dict) -> str:
    ps = "".join(f" {k}={v}" if v else f" {k}" for k, v in params.items())
    return f"RCPT TO:<{addr}>{ps}"


class ProxyBackend:
    def __init__(self, conn, next_hop: tuple[str, int], timeout: float, spool=None):
        self.conn = conn
        self.host, self.port = next_hop
        self.timeout = timeout
        self.spool = spool
        self.hop: NextHop | None = None
        self.mail_params: dict = {}
        self.sender = ""
        self.forwarded: list[tuple[str, dict]] = []
        self.in_tx = False  # a MAIL is open at the next hop

    async def _ensure(self) -> NextHop:
        if self.hop is None or self.hop.writer is None:
            hop = NextHop(self.host, self.port, self.timeout, self.conn.s.hostname)
            await hop.connect()
            xf = self.conn.xforward
            if xf and getattr(hop, "xforward_attrs", None):
                items = [f"{k}={v}" for k, v in xf.items() if k in hop.xforward_attrs and v]
                if items:
                    code, lines = await hop.command("XFORWARD " + " ".join(items))
                    if code != 250:
                        log.warning("next hop refused XFORWARD: %s %s", code, lines)
            self.hop = hop
        return self.hop

    async def mail(self, ctx, sender, params):
        try:
            hop = await self._ensure()
            if "SMTPUTF8" in params and "SMTPUTF8" not in hop.features:
                return (553, "5.6.7", "The next hop does not support SMTPUTF8")
            code, lines = await hop.command(_mail_cmd(sender, params))
        except NextHopError as exc:
            log.error("proxy: %s", exc)
            await self._drop()
            return (451, "4.4.1", "Next hop not available, try again later")
        if code != 250:
            return _as_reply(code, lines)
        self.sender, self.mail_params, self.forwarded = sender, params, []
        self.in_tx = True
        return None

    async def rcpt(self, address, params):
        try:
            code, lines = await self.hop.command(_rcpt_cmd(address, params))
        except (NextHopError, AttributeError) as exc:
            log.error("proxy: %s", exc)
            await self._drop()
            return (451, "4.4.1", "Next hop not available, try again later")
        if code not in (250, 251):
            return _as_reply(code, lines)
        self.forwarded.append((address, params))
        return None

    async def rset(self):
        if not self.in_tx:
            return  # the next hop's transaction already ended (DATA done): no RSET round trip
        self.in_tx = False
        if self.hop is not None and self.hop.writer is not None:
            try:
                await self.hop.command("RSET")
            except NextHopError:
                await self._drop()
        self.forwarded = []

    async def _drop(self):
        if self.hop is not None:
            await self.hop.close()
        self.hop = None

    async def close(self):
        await self._drop()

    async def end_of_data(self, ctx, result, disp, rcpt_params) -> tuple:
        data = result.message_bytes()
        await _hold(self.conn, self.spool, ctx, result, disp, data,
                    ctx.transaction.mail_params, rcpt_params)
        await _dropped_and_discarded(self.conn, ctx, result, disp)
        if not disp.deliver:
            await self.rset()
            return (250, "2.0.0", f"Ok: {ctx.transaction.id} accepted (not forwarded)")
        want = {a.lower() for a in disp.deliver}
        try:
            hop = self.hop
            if hop is None:
                raise NextHopError("no next-hop connection")
            if {a.lower() for a, _ in self.forwarded} != want:
                # some recipients must not get it: replay the transaction with the others
                code, lines = await hop.command("RSET")
                code, lines = await hop.command(_mail_cmd(self.sender, self.mail_params))
                if code != 250:
                    return _as_reply(code, lines)
                ok = 0
                for a, p in self.forwarded:
                    if a.lower() in want:
                        code, lines = await hop.command(_rcpt_cmd(a, p))
                        if code in (250, 251):
                            ok += 1
                        else:
                            # the next hop accepted it a moment ago: do not lose it silently
                            await hop.command("RSET")
                            return (451, "4.4.0", "Next hop changed its mind, try again later")
                if not ok:
                    return (451, "4.4.0", "Next hop refused the recipients, try again later")
            code, lines = await hop.send_data(data)
            if hop.data_sent:
                self.in_tx = False  # the final reply ends the next hop's transaction
        except NextHopError as exc:
            log.error("proxy id=%s: %s", ctx.transaction.id, exc)
            await self._drop()
            return (451, "4.4.1", "Next hop not available, try again later")
        self.forwarded = []
        reply = _as_reply(code, lines)
        log.info("proxy id=%s from=<%s> to=%s: next hop answered %s", ctx.transaction.id,
                 ctx.transaction.mail_from, ",".join(disp.deliver), " ".join(map(str, reply)))
        return reply
