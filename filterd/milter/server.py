"""The milter front door: libmilter (through pymilter) in front of the asynchronous pipeline.

Threads: libmilter runs one thread per MTA connection and calls our callbacks there. The pipeline
is asynchronous and its services (DNS, Redis, SQLite) belong to one event loop, so each milter
process runs exactly one asyncio loop in a background thread and the callbacks hand it whole
coroutines with :func:`asyncio.run_coroutine_threadsafe`, blocking their own (GIL-free) wait.

Round trips cost more than work here, so per message there is normally ONE hand-over, at end of
message. A phase whose hook no plugin implements (connect, helo, mail_from, rcpt_to) cannot
change the outcome early, so it is negotiated as "no reply" with the MTA and its pipeline call
runs at end of message, in order, before the content scan — the same Pipeline methods in the same
order as the SMTP gateway. As soon as a plugin implements e.g. ``rcpt_to``, that callback waits for
the pipeline and can reject the recipient at RCPT time. Headers and body are always "no reply";
EOH, DATA and unknown commands are not requested at all.

Error policy: an exception in this module or the pipeline, or the end-of-message ``timeout``,
gives ``[milter] on_error`` (tempfail 451 4.3.0 by default). Plugin failures follow the plugin
host's own ``on_error`` (tempfail by default). If filterd is not reachable at all, or exceeds the
MTA's own timeouts, the MTA's ``milter_default_action`` decides (see README "Milter mode").
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import Milter
import milter

from ..model import Session
from ..verdict import Action, Verdict
from . import actions as milter_actions

log = logging.getLogger("filterd.milter")

EARLY_HOOKS = ("connect", "helo", "mail_from", "rcpt_to")

# Macros asked from the MTA during negotiation (libmilter allows 5 per stage). Postfix honours
# the request; for Sendmail set the same lists with confMILTER_MACROS_* (README "Milter mode").
REQUESTED_MACROS = {
    milter.M_CONNECT: "j {daemon_name} {daemon_addr} {daemon_port} {client_ptr}",
    milter.M_HELO: "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    milter.M_ENVFROM: "i {auth_type} {auth_authen} {auth_author} {mail_addr}",
    milter.M_EOM: "i {auth_authen} {tls_version} {cipher}",
}

WANTED_ACTIONS = (milter.ADDHDRS | milter.CHGHDRS | milter.DELRCPT | milter.CHGBODY
                  | milter.QUARANTINE)

SMFI_CODE = {"continue": milter.CONTINUE, "reject": milter.REJECT,
             "tempfail": milter.TEMPFAIL, "discard": milter.DISCARD}

ERROR_VERDICT = {
    "tempfail": Verdict.tempfail("Temporary local problem (mail filter); please try again later",
                                 code=451, enhanced="4.3.0", source="milter"),
    "reject": Verdict.reject("Message could not be checked by the mail filter", code=550,
                             enhanced="5.3.0", source="milter"),
}


class LoopThread:
    """One asyncio event loop in a daemon thread; ``run(coro, timeout)`` from any other thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.own = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self.thread: threading.Thread | None = None

    def start(self) -> "LoopThread":
        if self.own:
            self.thread = threading.Thread(target=self._run, name="filterd-milter-loop",
                                           daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.own and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class MilterSettings:
    listen: str = ""
    socket_mode: int = 0o660
    workers: int = 1
    backlog: int = 128
    io_timeout: float = 60.0
    timeout: float = 120.0
    max_size: int = 20 * 1024 * 1024
    oversize: str = "scan"
    on_error: str = "tempfail"
    quarantine: str = "auto"
    header_position: str = "top"
    request_macros: bool = True
    name: str = "filterd"
    switch_interval: float = 0.0005

    @classmethod
    def from_config(cls, config, listen: str | None = None,
                    workers: int | None = None) -> "MilterSettings":
        g = lambda k: config.get(f"milter.{k}")  # noqa: E731
        w = workers if workers is not None else int(g("workers"))
        return cls(
            listen=listen or g("listen") or "",
            socket_mode=int(str(g("socket_mode")), 8),
            workers=w if w > 0 else (os.cpu_count() or 1),
            backlog=int(g("backlog")),
            io_timeout=config.duration("milter.io_timeout"),
            timeout=config.duration("milter.timeout"),
            max_size=config.size("milter.max_size"),
            oversize=g("oversize"),
            on_error=g("on_error"),
            quarantine=g("quarantine"),
            header_position=g("header_position"),
            request_macros=bool(g("request_macros")),
            name=g("name") or "filterd",
            switch_interval=config.duration("server.switch_interval"),
        )


def live_hooks(pipeline) -> dict[str, bool]:
    """Which early phases some plugin may have to answer at that step (the MTA must then wait
    for a reply; see :meth:`filterd.plugin_host.PluginHost.wants`)."""
    return {h: pipeline.host.wants(h) for h in EARLY_HOOKS}


class MilterServer:
    """Shared state of one milter process: settings, pipeline, loop thread, counters."""

    def __init__(self, settings: MilterSettings, pipeline, loop: LoopThread):
        self.settings = settings
        self.pipeline = pipeline
        self.loop = loop
        self.live = live_hooks(pipeline)
        self.lock = threading.Lock()
        self.stats = {"connections": 0, "messages": 0, "errors": 0}

    def swap_pipeline(self, pipeline) -> None:
        """Use ``pipeline`` for connections negotiated from now on (config reload); connections
        already open finish on the pipeline they started with."""
        self.pipeline, self.live = pipeline, live_hooks(pipeline)

    def quarantine_mode(self, pipe) -> str:
        mode = self.settings.quarantine
        if mode == "auto":
            return "store" if pipe.services.extra.get("quarantine") else "hold"
        return mode

    def count(self, key: str) -> None:
        with self.lock:
            self.stats[key] += 1

    # -- the end-of-message coroutine (runs on the loop) -------------------------------------
    async def end_of_message(self, pipe, tx: "TxState", session: Session, raw: bytes,
                             headers: list[tuple[str, str]], truncated: bool):
        s = self.settings
        early = await owed_phases(pipe, tx, session)
        if early is not None:
            return _verdict_plan(early), None
        ctx = tx.ctx
        rejected = tx.rejected
        if not ctx.recipients:
            v = next(iter(rejected.values()), None) or Verdict.reject("No valid recipients")
            return _verdict_plan(v), None

        if truncated and s.oversize != "scan":
            if s.oversize == "accept":
                p = milter_actions.MilterPlan(notes=["oversize-unscanned"])
                return p, None
            v = (Verdict.reject("Message too large for the mail filter", code=552,
                                enhanced="5.3.4") if s.oversize == "reject" else
                 Verdict.tempfail("Message too large for the mail filter", code=452,
                                  enhanced="4.3.4"))
            return _verdict_plan(v), None

        result = await pipe.data(ctx, raw)
        from ..pipeline import RecipientOutcome

        for addr, v in rejected.items():
            result.outcomes[addr] = RecipientOutcome(addr, v.action, 0.0, v)
        mode = self.quarantine_mode(pipe)
        p = milter_actions.plan(result, headers, mode, can_replace_body=not truncated)
        if truncated:
            p.notes.append("oversize-scanned-partially")
        if p.store_recipients:
            p = await self._store(pipe, ctx, result, p)
        return p, result

    async def _store(self, pipe, ctx, result, p):
        svc = pipe.services.extra.get("quarantine")
        try:
            if svc is None:
                raise RuntimeError("[milter] quarantine = store/both but no quarantine service "
                                   "is configured (services.extra['quarantine'])")
            await svc.hold(ctx, result, list(p.store_recipients))
        except Exception as exc:  # noqa: BLE001 - a message we cannot store must not be lost
            log.error("quarantine store failed for %s: %s; tempfailing the message",
                      ", ".join(p.store_recipients), exc)
            return _verdict_plan(Verdict.tempfail(
                "Temporary local problem (quarantine unavailable); please try again later",
                code=451, enhanced="4.3.0"))
        return p

    @staticmethod
    async def after_message(pipe, ctx, p: milter_actions.MilterPlan, reason: str) -> None:
        for addr in p.quarantined:
            await pipe.quarantined(ctx, addr, reason)


async def owed_phases(pipe, tx: "TxState", session: Session) -> Verdict | None:
    """Run the early phases not run live so far, in pipeline order: connect, HELO, MAIL FROM and
    the recipients waiting in ``tx.pending_rcpts`` (a recipient refused here is remembered in
    ``tx.rejected`` for end of message). Returns a verdict that ends the transaction (reject or
    tempfail at connect, HELO or MAIL FROM), else None."""
    early = tx.early
    if early is None and tx.run_connect:
        early = await pipe.connect(session)
    if early is None and tx.run_helo and session.helo:
        early = await pipe.helo(session, session.helo)
    tx.run_connect = tx.run_helo = False
    if tx.ctx is None:
        tx.ctx = pipe.begin(session)
        if early is None:
            early = await pipe.mail_from(tx.ctx, tx.sender, tx.mail_params)
    tx.early = early
    if early is not None and early.action in (Action.REJECT, Action.TEMPFAIL):
        return early
    pending, tx.pending_rcpts = tx.pending_rcpts, []
    for addr, params in pending:
        v = await pipe.rcpt_to(tx.ctx, addr, params)
        if v.action in (Action.REJECT, Action.TEMPFAIL):
            tx.rejected[addr] = v
    return None


def _verdict_plan(v: Verdict) -> milter_actions.MilterPlan:
    p = milter_actions.MilterPlan()
    if v.action is Action.TEMPFAIL:
        p.result = "tempfail"
    elif v.action is Action.REJECT:
        p.result = "reject"
    elif v.action is Action.DISCARD:
        p.result = "discard"
    else:
        return p
    p.reply = milter_actions.reply_of(v) if p.result != "discard" else None
    return p


@dataclass
class TxState:
    """One MAIL transaction as seen through the milter."""

    sender: str = ""
    mail_params: dict = field(default_factory=dict)
    ctx: object = None  # ScanContext once the MAIL FROM phase ran (live or caught up)
    early: Verdict | None = None
    run_connect: bool = False
    run_helo: bool = False
    pending_rcpts: list = field(default_factory=list)  # (address, params) not run yet
    rejected: dict = field(default_factory=dict)  # address -> verdict, refused when caught up
    rcpt_raw: dict = field(default_factory=dict)  # address -> form the MTA gave (for delrcpt)


_SERVER: MilterServer | None = None


def _text(v) -> str:
    return v.decode("utf-8", "surrogateescape") if isinstance(v, (bytes, bytearray)) else str(v)


def _guard(nr_bit: int):
    """Callbacks must never raise into libmilter: a failure is logged and remembered, the
    callback answers as negotiated (NOREPLY when the MTA expects no answer, else the error
    policy), and end of message applies the error policy."""
    def wrap(fn):
        def inner(self, *args):
            try:
                return fn(self, *args)
            except Exception as exc:  # noqa: BLE001
                log.exception("milter callback %s failed", fn.__name__)
                self.failure = self.failure or f"{fn.__name__}: {type(exc).__name__}: {exc}"
                if self.nr & nr_bit:
                    return milter.NOREPLY
                return self._error(self.failure, self.tx)
        inner.__name__ = fn.__name__
        return inner
    return wrap


def _strip_angle(addr) -> str:
    addr = _text(addr).strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    return addr


def _params(args) -> dict:
    out = {}
    for a in args:
        a = a.decode("utf-8", "surrogateescape") if isinstance(a, bytes) else a
        k, _, v = a.partition("=")
        out[k.upper()] = v
    return out


class FilterdMilter(Milter.Base):
    """One MTA connection. Callbacks run in that connection's libmilter thread."""

    def __init__(self, server: MilterServer):
        self.server = server
        # the pipeline and the early phases that wait for it are fixed per connection at
        # negotiation (the no-reply flags agreed with the MTA depend on them)
        self.pipeline = server.pipeline
        self.live = dict(server.live)
        self.session = Session(front_door="milter")
        self.nr = 0  # negotiated no-reply bits
        self.leadspc = False
        self.connect_pending = False
        self.helo_pending = False
        self.failure = ""
        self._reset()

    def _reset(self) -> None:
        self.tx: TxState | None = None
        self.headers: list[tuple[str, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def _ok(self, nr_bit: int) -> int:
        return milter.NOREPLY if self.nr & nr_bit else milter.CONTINUE

    # -- negotiation -----------------------------------------------------------------------
    def negotiate(self, opts):
        s = self.server.settings
        live = self.live
        offered_actions, offered_proto = opts[0], opts[1]
        actions = offered_actions & WANTED_ACTIONS
        if s.request_macros and offered_actions & milter.SETSYMLIST:
            actions |= milter.SETSYMLIST
        self._actions = actions
        want = (milter.P_NOEOH | milter.P_NODATA | milter.P_NOUNKNOWN | milter.P_HDR_LEADSPC
                | milter.P_NR_HDR | milter.P_NR_BODY)
        for hook, bit in (("connect", milter.P_NR_CONN), ("helo", milter.P_NR_HELO),
                          ("mail_from", milter.P_NR_MAIL), ("rcpt_to", milter.P_NR_RCPT)):
            if not live[hook]:
                want |= bit
        proto = offered_proto & want
        self._protocol = proto
        self.nr = proto & (milter.P_NR_CONN | milter.P_NR_HELO | milter.P_NR_MAIL
                           | milter.P_NR_RCPT | milter.P_NR_HDR | milter.P_NR_BODY)
        self.leadspc = bool(proto & milter.P_HDR_LEADSPC)
        if actions & milter.SETSYMLIST:
            for stage, macros in REQUESTED_MACROS.items():
                try:
                    self._ctx.setsymlist(stage, macros)
                except Exception:  # noqa: BLE001 - an MTA that refuses keeps its own lists
                    log.debug("MTA refused macro list for stage %s", stage)
        opts[0], opts[1], opts[2], opts[3] = actions, proto, 0, 0
        return milter.CONTINUE

    # -- callbacks -------------------------------------------------------------------------
    @_guard(milter.P_NR_CONN)
    def connect(self, hostname, family, hostaddr):
        srv = self.server
        srv.count("connections")
        sess = self.session
        if isinstance(hostaddr, tuple) and hostaddr:
            sess.peer_ip = str(hostaddr[0])
            sess.peer_port = int(hostaddr[1]) if len(hostaddr) > 1 else 0
        elif family == "unix" or isinstance(hostaddr, str):
            sess.peer_ip = "127.0.0.1"
        if hostname and hostname != "unknown" and not hostname.startswith("["):
            sess.peer_name = hostname
        sess.local_ip = self._macro("{daemon_addr}")
        try:
            sess.local_port = int(self._macro("{daemon_port}") or 0)
        except ValueError:
            pass
        sess.data["mta"] = self._macro("j")
        if self.live["connect"]:
            return self._early(self.pipeline.connect(sess), milter.P_NR_CONN, store=False)
        self.connect_pending = True
        return self._ok(milter.P_NR_CONN)

    @_guard(milter.P_NR_HELO)
    def hello(self, heloname):
        self.session.helo = _text(heloname or "")
        self._read_tls()
        if self.live["helo"]:
            return self._early(self.pipeline.helo(self.session, self.session.helo),
                               milter.P_NR_HELO, store=False)
        self.helo_pending = True
        return self._ok(milter.P_NR_HELO)

    @_guard(milter.P_NR_MAIL)
    def envfrom(self, sender, *params):
        self._reset()
        self.failure = ""
        self._read_tls()
        self.session.auth_user = self._macro("{auth_authen}") or self.session.auth_user
        tx = self.tx = TxState(sender=_strip_angle(sender), mail_params=_params(params))
        tx.run_connect, tx.run_helo = self.connect_pending, self.helo_pending
        self.connect_pending = self.helo_pending = False
        if self.live["mail_from"] and self.pipeline.host.wants("mail_from", self.session):
            # a plugin may answer MAIL FROM for this client: the phases owed so far run first
            return self._early(owed_phases(self.pipeline, tx, self.session), milter.P_NR_MAIL,
                               store=True)
        return self._ok(milter.P_NR_MAIL)

    @_guard(milter.P_NR_RCPT)
    def envrcpt(self, rcpt, *params):
        tx = self.tx
        if tx is None:  # RCPT without MAIL: the MTA would not do that
            raise RuntimeError("RCPT without MAIL FROM")
        rcpt = _text(rcpt)
        addr = _strip_angle(rcpt)
        tx.rcpt_raw[addr.lower()] = rcpt
        p = _params(params)
        pipe = self.pipeline
        if (self.live["rcpt_to"] and tx.early is None
                and pipe.host.wants("rcpt_to", self.session, addr)):
            async def run():
                v = await owed_phases(pipe, tx, self.session)
                return v if v is not None else await pipe.rcpt_to(tx.ctx, addr, p)
            return self._early(run(), milter.P_NR_RCPT, store=False)
        # nothing to answer now: the phase runs at end of message, in order
        tx.pending_rcpts.append((addr, p))
        return self._ok(milter.P_NR_RCPT)

    @_guard(milter.P_NR_HDR)
    def header_bytes(self, name, value):
        if self.tx is not None and not self.truncated:
            n = len(name) + len(value) + 4
            if self.size + n > self.server.settings.max_size:
                self.truncated = True
            else:
                self.size += n
                self.headers.append((name, value))
        return self._ok(milter.P_NR_HDR)

    @_guard(milter.P_NR_BODY)
    def body(self, chunk):
        if self.tx is not None and not self.truncated:
            room = self.server.settings.max_size - self.size
            if len(chunk) > room:
                chunk = chunk[:max(room, 0)]
                self.truncated = True
            self.chunks.append(chunk)
            self.size += len(chunk)
        return self._ok(milter.P_NR_BODY)

    def eom(self):
        srv = self.server
        s = srv.settings
        tx = self.tx
        t0 = time.monotonic()
        try:
            if self.failure:
                return self._error(self.failure, tx)
            if tx is None:
                raise RuntimeError("end of message without MAIL FROM")
            queue_id = self._macro("i")
            self._read_tls()
            self.session.auth_user = self._macro("{auth_authen}") or self.session.auth_user
            raw, headers = self._message()
            p, result = srv.loop.run(
                srv.end_of_message(self.pipeline, tx, self.session, raw, headers,
                                   self.truncated), s.timeout)
            rc = self._apply(p, tx)
            srv.count("messages")
            ctx = tx.ctx
            if ctx is not None:
                ctx.transaction.data["queue_id"] = queue_id
            if p.quarantined and ctx is not None:
                reason = (result.outcomes[p.quarantined[0]].verdict.reason
                          if result is not None else "")
                srv.loop.submit(srv.after_message(self.pipeline, ctx, p, reason))
            if log.isEnabledFor(logging.INFO):
                log.info("milter qid=%s id=%s from=<%s> rcpts=%d size=%d %s (%.1f ms)",
                         queue_id or "-", ctx.transaction.id if ctx is not None else "-",
                         tx.sender, len(tx.rcpt_raw), self.size, p.summary(),
                         (time.monotonic() - t0) * 1000)
            return rc
        except FutureTimeout:
            return self._error(f"pipeline did not finish within [milter] timeout "
                               f"{s.timeout:g}s", tx)
        except Exception as exc:  # noqa: BLE001 - never crash the milter thread
            log.exception("milter end of message failed")
            return self._error(f"{type(exc).__name__}: {exc}", tx)
        finally:
            self._reset()
            self.failure = ""

    def abort(self):
        self._reset()
        return milter.CONTINUE

    def close(self):
        self._reset()
        return milter.CONTINUE

    # -- helpers ---------------------------------------------------------------------------
    def _macro(self, name: str) -> str:
        try:
            v = self._ctx.getsymval(name)
        except Exception:  # noqa: BLE001
            return ""
        return v or ""

    def _read_tls(self) -> None:
        v = self._macro("{tls_version}")
        if v:
            self.session.tls = True
            self.session.tls_version = v
            self.session.tls_cipher = self._macro("{cipher}")

    def _message(self) -> tuple[bytes, list[tuple[str, str]]]:
        nl = b"\r\n"
        parts = []
        hdrs = []
        for name, value in self.headers:
            name_b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
            v = value.replace(b"\r\n", b"\n").replace(b"\n", nl)
            sep = b":" if self.leadspc else b": "
            parts.append(name_b + sep + v + nl)
            hdrs.append((name_b.decode("utf-8", "surrogateescape"),
                         v.decode("utf-8", "surrogateescape")))
        return b"".join(parts) + nl + b"".join(self.chunks), hdrs

    def _early(self, coro, nr_bit: int, store: bool) -> int:
        """Run an early pipeline phase now and map a final verdict to a milter reply."""
        srv = self.server
        try:
            v = srv.loop.run(coro, srv.settings.timeout)
        except Exception as exc:  # noqa: BLE001
            log.exception("milter early phase failed")
            return self._error(f"{type(exc).__name__}: {exc}", self.tx)
        if v is None or v.action not in (Action.REJECT, Action.TEMPFAIL):
            return milter.CONTINUE
        if store and self.tx is not None:
            self.tx.early = v
        code, enh, text = milter_actions.reply_of(v)
        self._ctx.setreply(str(code), enh, text)
        return milter.REJECT if v.action is Action.REJECT else milter.TEMPFAIL

    def _apply(self, p: milter_actions.MilterPlan, tx: TxState) -> int:
        ctx = self._ctx
        if p.result in ("reject", "tempfail"):
            if p.reply:
                code, enh, text = p.reply
                ctx.setreply(str(code), enh, text)
            return SMFI_CODE[p.result]
        if p.result == "discard":
            return milter.DISCARD
        lead = " " if self.leadspc else ""
        for addr in p.delete_rcpts:
            raw_rcpt = tx.rcpt_raw.get(addr.lower())
            if raw_rcpt is None:
                # a recipient a plugin added or rewrote (aliases): the MTA's envelope does not
                # have it, and the MTA does its own alias expansion
                log.info("milter: outcome for <%s> not applied: not an envelope recipient", addr)
                continue
            ctx.delrcpt(raw_rcpt)
        for name, idx, value in p.change_headers:
            ctx.chgheader(name, idx, (lead + value) if value else "")
        if self.server.settings.header_position == "top":
            for name, value in reversed(p.add_headers):
                ctx.addheader(name, lead + value, 0)
        else:
            for name, value in p.add_headers:
                ctx.addheader(name, lead + value, -1)
        if p.replace_body is not None:
            body = p.replace_body
            for i in range(0, len(body), 65535):
                ctx.replacebody(body[i:i + 65535])
            if not body:
                ctx.replacebody(b"")
        if p.hold_reason:
            ctx.quarantine(p.hold_reason)
        return milter.CONTINUE

    def _error(self, what: str, tx) -> int:
        srv = self.server
        srv.count("errors")
        policy = srv.settings.on_error
        log.error("milter internal error (%s); applying [milter] on_error = %s", what, policy)
        if policy == "accept":
            return milter.ACCEPT
        v = ERROR_VERDICT[policy]
        code, enh, text = milter_actions.reply_of(v)
        try:
            self._ctx.setreply(str(code), enh, text)
        except Exception:  # noqa: BLE001
            pass
        return milter.TEMPFAIL if policy == "tempfail" else milter.REJECT


# -- registration with libmilter ----------------------------------------------------------------
def _negotiate(ctx, opts):
    m = FilterdMilter(_SERVER)
    m._setctx(ctx)
    return m.negotiate(opts)


def _connect(ctx, hostname, family, hostaddr):
    m = ctx.getpriv()
    if m is None:  # MTA without negotiation (milter protocol 2)
        m = FilterdMilter(_SERVER)
        m._setctx(ctx)
    return m.connect(hostname, family, hostaddr)


def _close(ctx):
    m = ctx.getpriv()
    if m is None:
        return milter.CONTINUE
    try:
        return m.close()
    finally:
        m._setctx(None)


def register(s: MilterSettings) -> None:
    """Install the callbacks with libmilter (before opening the socket and forking workers).
    The per-process :class:`MilterServer` is set in ``_SERVER`` before ``milter.main()``."""
    milter.set_connect_callback(_connect)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(_close)
    policy = {"tempfail": milter.TEMPFAIL, "reject": milter.REJECT,
              "accept": milter.CONTINUE}[s.on_error]
    milter.set_exception_policy(policy)
    milter.setconn(s.listen)
    milter.settimeout(int(s.io_timeout))
    milter.setbacklog(s.backlog)
    milter.set_flags(WANTED_ACTIONS | milter.SETSYMLIST)
    milter.register(s.name, negotiate=_negotiate)


def open_socket(settings: MilterSettings) -> None:
    try:
        milter.opensocket(True)
    except milter.error as exc:
        raise OSError(f"milter: cannot listen on {settings.listen!r} ([milter] listen): {exc}; "
                      "is another process using it?") from exc
    if settings.listen.startswith(("unix:", "local:")):
        path = settings.listen.split(":", 1)[1]
        try:
            os.chmod(path, settings.socket_mode)
        except OSError as exc:
            log.warning("milter: cannot chmod %s: %s", path, exc)
    else:
        set_nodelay(settings.listen)


def set_nodelay(spec: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (Linux hands it on to every accepted
    connection). libmilter never sets it, and at end of message a milter writes several small
    packets in a row (header changes, then the reply): with Nagle's algorithm each one after the
    first waits for the MTA's delayed ACK, up to 40 ms per message. libmilter does not expose the
    socket, so it is found among our descriptors by its listening port (``spec`` is
    ``inet:PORT@HOST``; bench/milter_bench.py's null milter uses it too)."""
    import socket as so

    port = int(spec.split(":", 1)[1].split("@", 1)[0])
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")) if os.path.isdir(
            "/proc/self/fd") else range(3, 256):
        try:
            s = so.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == so.SOCK_STREAM and s.family in (so.AF_INET, so.AF_INET6) and \
                    s.getsockname()[1] == port and s.getsockopt(so.SOL_SOCKET, so.SO_ACCEPTCONN):
                s.setsockopt(so.IPPROTO_TCP, so.TCP_NODELAY, 1)
                return
        except OSError:
            pass
        finally:
            s.close()
    log.warning("milter: listening socket for %s not found; TCP_NODELAY not set (replies to the "
                "MTA may wait for delayed ACKs)", spec)


def check_listen(spec: str) -> str:
    """Validate a milter socket spec; returns it or raises ValueError with a clear message."""
    from ..config import ConfigError, ConfigProblem

    kind, _, rest = spec.partition(":")
    ok = False
    if kind in ("unix", "local") and rest:
        ok = True
    elif kind in ("inet", "inet6") and rest:
        port = rest.split("@", 1)[0]
        ok = port.isdigit() and 0 < int(port) < 65536
    if not ok:
        raise ConfigError([ConfigProblem(
            "--milter/--listen or config", None, "milter.listen",
            f"bad milter socket {spec!r}: expected inet:PORT@HOST, inet6:PORT@HOST or "
            "unix:/path/to/socket")])
    return spec


# -- running ------------------------------------------------------------------------------------
def _serve_one(settings: MilterSettings, config_path, overrides, use_default_path: bool) -> int:
    """One milter process: own loop thread and pipeline, libmilter's main loop in this thread."""
    from ..pipeline import Pipeline

    if settings.switch_interval > 0:
        sys.setswitchinterval(settings.switch_interval)
    loop = LoopThread().start()
    try:
        pipeline = loop.run(Pipeline.create(config_path, overrides, use_default_path))
    except Exception:
        loop.stop()
        raise
    server = MilterServer(settings, pipeline, loop)
    global _SERVER
    _SERVER = server
    log.info("milter pid %d ready on %s (early phases waiting for plugins: %s)", os.getpid(),
             settings.listen, ",".join(h for h, v in server.live.items() if v) or "none")
    try:
        rc = milter.main()
    finally:
        try:
            loop.run(pipeline.close(), 30)
        except Exception:  # noqa: BLE001
            log.exception("pipeline shutdown failed")
        loop.stop()
    return 0 if rc in (None, 0) else 1


def run_milter(config, config_path=None, overrides=(), listen: str | None = None,
               workers: int | None = None, use_default_path: bool = True) -> int:
    """Blocking: run the milter (``filterd milter``). With several workers the listening socket
    is opened once and each forked worker serves it with its own loop and pipeline; the parent
    restarts a worker that dies and forwards SIGTERM/SIGINT/SIGHUP."""
    settings = MilterSettings.from_config(config, listen, workers)
    if not settings.listen:
        from ..config import ConfigError, ConfigProblem

        raise ConfigError([ConfigProblem("config", None, "milter.listen",
                                         "no milter socket configured: set [milter] listen or "
                                         "pass --listen inet:PORT@HOST")])
    check_listen(settings.listen)
    register(settings)
    open_socket(settings)
    print(f"filterd: ready: milter on {settings.listen}", file=sys.stderr, flush=True)
    if settings.workers <= 1:
        try:
            return _serve_one(settings, config_path, overrides, use_default_path)
        finally:
            _remove_socket(settings)
    return _supervise(settings, config_path, overrides, use_default_path)


def _remove_socket(settings: MilterSettings) -> None:
    if settings.listen.startswith(("unix:", "local:")):
        try:
            os.unlink(settings.listen.split(":", 1)[1])
        except OSError:
            pass


def _supervise(settings, config_path, overrides, use_default_path) -> int:
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = _serve_one(settings, config_path, overrides, use_default_path)
            except BaseException:  # noqa: BLE001
                log.exception("milter worker %d failed", os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    for i in range(settings.workers):
        spawn(i)
    log.info("milter supervisor pid %d: %d workers on %s", os.getpid(), settings.workers,
             settings.listen)
    rc = 0
    last_spawn = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        slot = children.pop(pid, None)
        if slot is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        log.error("milter worker %d exited with %s; restarting it", pid, code)
        rc = 1
        if time.monotonic() - last_spawn < 1:
            time.sleep(1)
        last_spawn = time.monotonic()
        spawn(slot)
    _remove_socket(settings)
    return 0 if stopping else rc


def swap_pipeline(pipeline) -> None:
    """After a config reload in ``filterd serve``: new milter connections use ``pipeline``."""
    if _SERVER is not None:
        _SERVER.swap_pipeline(pipeline)


async def run_milter_from_config(config, pipeline, listen: str | None = None) -> None:
    """Run the milter inside an already running asyncio program (``filterd serve``), on THIS
    loop and with THIS pipeline, until cancelled or until libmilter stops. One process:
    ``[milter] workers`` applies to ``filterd milter`` only; libmilter can run once per process.
    Returns at once when no milter socket is configured (``[milter] listen`` = "" and no
    ``listen`` argument). Prints ``filterd: ready: milter on SPEC`` to stderr when listening."""
    settings = MilterSettings.from_config(config, listen, 1)
    if not settings.listen:
        return
    check_listen(settings.listen)
    loop = LoopThread(asyncio.get_running_loop())
    global _SERVER
    _SERVER = MilterServer(settings, pipeline, loop)
    register(settings)
    open_socket(settings)
    print(f"filterd: ready: milter on {settings.listen}", file=sys.stderr, flush=True)
    done = asyncio.get_running_loop().run_in_executor(None, milter.main)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        milter.stop()
        await done
        raise
    finally:
        _remove_socket(settings)
