"""The milter front door: shared by both milter engines.

Two engines speak the milter protocol to the MTA (``[milter] engine``):

- ``native`` (:mod:`filterd.milter.native`, the default): filterd's own asyncio implementation
  of the protocol (:mod:`filterd.milter.protocol`); each MTA connection is a protocol object on
  the event loop that runs the pipeline.
- ``pymilter`` (:mod:`filterd.milter.libmilter`): Sendmail's libmilter through pymilter, one
  thread per MTA connection, handing the pipeline work to the event loop in a thread.

Everything else is here and shared: :class:`MilterSession` (the callbacks: what each SMTP step
records, when a pipeline phase runs, how a plan becomes milter operations, the error policy),
:class:`MilterServer` (per process: settings, pipeline, the end-of-message coroutine), and
starting, forking and stopping.

Round trips cost more than work here, so per message there is normally ONE pipeline call, at end
of message. A phase whose hook no plugin implements (connect, helo, mail_from, rcpt_to) cannot
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
from dataclasses import dataclass, field

from ..model import Message, Session
from ..pipeline import RecipientOutcome
from ..verdict import Action, Verdict
from . import actions as milter_actions
from . import protocol as P

log = logging.getLogger("filterd.milter")

EARLY_HOOKS = ("connect", "helo", "mail_from", "rcpt_to")
NR_OF = {"connect": P.P_NR_CONN, "helo": P.P_NR_HELO, "mail_from": P.P_NR_MAIL,
         "rcpt_to": P.P_NR_RCPT}
NR_ALL = P.P_NR_CONN | P.P_NR_HELO | P.P_NR_MAIL | P.P_NR_RCPT | P.P_NR_HDR | P.P_NR_BODY

# Macros asked from the MTA during negotiation (libmilter allows 5 per stage). Postfix honours
# the request; for Sendmail set the same lists with confMILTER_MACROS_* (README "Milter mode").
REQUESTED_MACROS = {
    P.M_CONNECT: "j {daemon_name} {daemon_addr} {daemon_port} {client_ptr}",
    P.M_HELO: "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    P.M_ENVFROM: "i {auth_type} {auth_authen} {auth_author} {mail_addr}",
    P.M_EOM: "i {auth_authen} {tls_version} {cipher}",
}

WANTED_ACTIONS = P.F_ADDHDRS | P.F_CHGHDRS | P.F_DELRCPT | P.F_CHGBODY | P.F_QUARANTINE

ERROR_VERDICT = {
    "tempfail": Verdict.tempfail("Temporary local problem (mail filter); please try again later",
                                 code=451, enhanced="4.3.0", source="milter"),
    "reject": Verdict.reject("Message could not be checked by the mail filter", code=550,
                             enhanced="5.3.0", source="milter"),
}


@dataclass
class MilterSettings:
    listen: str = ""
    engine: str = "native"
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
    delay_reject: bool = True
    name: str = "filterd"
    switch_interval: float = 0.0005
    event_loop: str = "auto"

    @classmethod
    def from_config(cls, config, listen: str | None = None,
                    workers: int | None = None) -> "MilterSettings":
        g = lambda k: config.get(f"milter.{k}")  # noqa: E731
        w = workers if workers is not None else int(g("workers"))
        return cls(
            listen=listen or g("listen") or "",
            engine=g("engine") or "native",
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
            delay_reject=bool(g("delay_reject")),
            name=g("name") or "filterd",
            switch_interval=config.duration("server.switch_interval"),
            event_loop=g("event_loop") or "auto",
        )


def live_hooks(pipeline) -> dict[str, bool]:
    """Which early phases some plugin may have to answer at that step (the MTA must then wait
    for a reply; see :meth:`filterd.plugin_host.PluginHost.wants`)."""
    return {h: pipeline.host.wants(h) for h in EARLY_HOOKS}


class MilterServer:
    """Shared state of one milter process: settings, pipeline, counters (and for the pymilter
    engine, the :class:`~filterd.milter.libmilter.LoopThread` that runs the pipeline)."""

    def __init__(self, settings: MilterSettings, pipeline, loop=None):
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
    async def end_of_message(self, pipe, tx: "TxState", session: Session, raw: Message,
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
    if early is not None and early.action.refuses:
        return early
    pending, tx.pending_rcpts = tx.pending_rcpts, []
    for addr, params in pending:
        v = await pipe.rcpt_to(tx.ctx, addr, params)
        if v.action.refuses:
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
    """Callbacks must never raise into the engine: a failure is logged and remembered, the
    callback answers as negotiated (no answer when the MTA expects none, else the error
    policy), and end of message applies the error policy."""
    def wrap(fn):
        def inner(self, *args):
            try:
                return fn(self, *args)
            except Exception as exc:  # noqa: BLE001
                log.exception("milter callback %s failed", fn.__name__)
                self.failure = self.failure or f"{fn.__name__}: {type(exc).__name__}: {exc}"
                if self.nr & nr_bit:
                    return self._noreply()
                return self._error(self.failure)
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


class MilterSession:
    """One MTA connection, whatever the engine. The engine turns the MTA's commands into the
    calls below and provides the five methods marked "engine" (answers and macros); what a
    callback returns is the engine's own answer (libmilter's return code, or for the native
    engine None or a coroutine to wait for)."""

    def __init__(self, server: MilterServer):
        self.server = server
        # the pipeline and the early phases that wait for it are fixed per connection at
        # negotiation (the no-reply flags agreed with the MTA depend on them)
        self.pipeline = server.pipeline
        self.live = dict(server.live)
        self.session = Session(front_door="milter")
        self.actions = 0  # negotiated actions
        self.nr = 0  # negotiated no-reply bits
        self.leadspc = False
        self.connect_pending = False
        self.helo_pending = False
        self.delayed_mail = False  # MAIL FROM is answered at RCPT TO (see choose)
        self._reset()

    def _reset(self) -> None:
        """Forget the transaction: envelope, message so far, and a callback failure in it."""
        self.failure = ""
        self.tx: TxState | None = None
        self.headers: list[tuple[str | bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    # -- engine ------------------------------------------------------------------------------
    def _macro(self, name: str) -> str:
        raise NotImplementedError

    def _noreply(self):
        """The answer to a step the MTA expects no reply to."""
        raise NotImplementedError

    def _continue(self):
        raise NotImplementedError

    def _early(self, coro, store: bool):
        """Run an early pipeline phase now; a reject/tempfail verdict becomes the reply (and
        with ``store`` ends the transaction)."""
        raise NotImplementedError

    def _reply_error(self, policy: str, reply: tuple[int, str, str] | None):
        """Answer with the error policy: ``accept``, or ``reject``/``tempfail`` with reply."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def _ok(self, nr_bit: int):
        return self._noreply() if self.nr & nr_bit else self._continue()

    def _early_refusal(self, v: Verdict | None, store: bool):
        """The (code, enhanced, text) an early phase's verdict ``v`` refuses the step with, or
        None when it lets the step go on; with ``store`` a refusal ends the transaction."""
        if v is None or not v.action.refuses:
            return None
        if store and self.tx is not None:
            self.tx.early = v
        return milter_actions.reply_of(v)

    def _error(self, what: str):
        srv = self.server
        srv.count("errors")
        policy = srv.settings.on_error
        log.error("milter internal error (%s); applying [milter] on_error = %s", what, policy)
        if policy == "accept":
            return self._reply_error(policy, None)
        return self._reply_error(policy, milter_actions.reply_of(ERROR_VERDICT[policy]))

    def choose(self, offered_actions: int, offered_proto: int) -> tuple[int, int, bool]:
        """Negotiation: from what the MTA offers, the actions and protocol steps filterd takes
        (and whether to send it the macro lists we want)."""
        s = self.server.settings
        actions = offered_actions & WANTED_ACTIONS
        symlist = bool(s.request_macros and offered_actions & P.F_SETSYMLIST)
        if symlist:
            actions |= P.F_SETSYMLIST
        want = (P.P_NOEOH | P.P_NODATA | P.P_NOUNKNOWN | P.P_HDR_LEADSPC | P.P_NR_HDR
                | P.P_NR_BODY)
        if s.delay_reject and self.live["mail_from"] and self.live["rcpt_to"] \
                and offered_proto & P.P_NR_MAIL:
            # as Postfix's smtpd_delay_reject: MAIL FROM is answered at the first RCPT TO,
            # whose reply the MTA waits for anyway (one round trip less per message)
            self.live["mail_from"] = False
            self.delayed_mail = True
        for hook in EARLY_HOOKS:
            if not self.live[hook]:
                want |= NR_OF[hook]
        proto = offered_proto & want
        self.actions, self.nr = actions, proto & NR_ALL
        self.leadspc = bool(proto & P.P_HDR_LEADSPC)
        return actions, proto, symlist

    def _read_tls(self) -> None:
        v = self._macro("{tls_version}")
        if v:
            self.session.tls = True
            self.session.tls_version = v
            self.session.tls_cipher = self._macro("{cipher}")

    @_guard(P.P_NR_CONN)
    def connect(self, hostname: str, ip: str | None, port: int):
        """``ip`` None: the client came over a unix socket or is unknown."""
        self.server.count("connections")
        sess = self.session
        sess.peer_ip = ip or "127.0.0.1"
        if ip:
            sess.peer_port = port
        if hostname and hostname != "unknown" and not hostname.startswith("["):
            sess.peer_name = hostname
        sess.local_ip = self._macro("{daemon_addr}")
        try:
            sess.local_port = int(self._macro("{daemon_port}") or 0)
        except ValueError:
            pass
        sess.data["mta"] = self._macro("j")
        if self.live["connect"]:
            return self._early(self.pipeline.connect(sess), store=False)
        self.connect_pending = True
        return self._ok(P.P_NR_CONN)

    @_guard(P.P_NR_HELO)
    def hello(self, heloname):
        self.session.helo = _text(heloname or "")
        self._read_tls()
        if self.live["helo"]:
            return self._early(self.pipeline.helo(self.session, self.session.helo),
                               store=False)
        self.helo_pending = True
        return self._ok(P.P_NR_HELO)

    @_guard(P.P_NR_MAIL)
    def envfrom(self, sender, *params):
        self._reset()
        self._read_tls()
        self.session.auth_user = self._macro("{auth_authen}") or self.session.auth_user
        tx = self.tx = TxState(sender=_strip_angle(sender), mail_params=_params(params))
        tx.run_connect, tx.run_helo = self.connect_pending, self.helo_pending
        self.connect_pending = self.helo_pending = False
        if self.live["mail_from"] and self.pipeline.host.wants("mail_from", self.session):
            # a plugin may answer MAIL FROM for this client: the phases owed so far run first
            return self._early(owed_phases(self.pipeline, tx, self.session), store=True)
        return self._ok(P.P_NR_MAIL)

    @_guard(P.P_NR_RCPT)
    def envrcpt(self, rcpt, *params):
        tx = self.tx
        if tx is None:  # RCPT without MAIL: the MTA would not do that
            raise RuntimeError("RCPT without MAIL FROM")
        rcpt = _text(rcpt)
        addr = _strip_angle(rcpt)
        tx.rcpt_raw[addr.lower()] = rcpt
        p = _params(params)
        pipe = self.pipeline
        if self.live["rcpt_to"] and self._answer_rcpt_now(tx, addr):
            async def run():
                v = await owed_phases(pipe, tx, self.session)
                return v if v is not None else await pipe.rcpt_to(tx.ctx, addr, p)
            return self._early(run(), store=False)
        # nothing to answer now: the phase runs at end of message, in order
        tx.pending_rcpts.append((addr, p))
        return self._ok(P.P_NR_RCPT)

    def _answer_rcpt_now(self, tx: "TxState", addr: str) -> bool:
        """Must this RCPT TO wait for the pipeline (rather than run at end of message)?"""
        if tx.early is not None:
            return tx.early.action.refuses  # a (delayed) MAIL FROM refusal answers every rcpt
        host = self.pipeline.host
        if host.wants("rcpt_to", self.session, addr):
            return True
        # with delay_reject, MAIL FROM is owed until the first RCPT TO runs it
        return self.delayed_mail and tx.ctx is None and host.wants("mail_from", self.session)

    @_guard(P.P_NR_HDR)
    def header_bytes(self, name, value: bytes):
        if self.tx is not None and not self.truncated:
            n = len(name) + len(value) + 4
            if self.size + n > self.server.settings.max_size:
                self.truncated = True
            else:
                self.size += n
                self.headers.append((name, value))
        return self._ok(P.P_NR_HDR)

    @_guard(P.P_NR_BODY)
    def body(self, chunk: bytes):
        self.keep_body(chunk)
        return self._ok(P.P_NR_BODY)

    def keep_body(self, chunk: bytes) -> None:
        """Store a body chunk, up to ``[milter] max_size`` (no answer: see :meth:`body`)."""
        if self.tx is not None and not self.truncated:
            room = self.server.settings.max_size - self.size
            if len(chunk) > room:
                chunk = chunk[:max(room, 0)]
                self.truncated = True
            self.chunks.append(chunk)
            self.size += len(chunk)

    def abort(self):
        self._reset()
        return self._continue()

    # -- end of message pieces -----------------------------------------------------------------
    def eom_input(self) -> tuple[str, Message, list[tuple[str, str]]]:
        """(queue id, the message as received, its headers) at end of message; raises when
        the message cannot be scanned (the caller applies the error policy)."""
        if self.tx is None:
            raise RuntimeError("end of message without MAIL FROM")
        queue_id = self._macro("i")
        self._read_tls()
        self.session.auth_user = self._macro("{auth_authen}") or self.session.auth_user
        raw, headers = self._message()
        return queue_id, raw, headers

    def eom_done(self, p: milter_actions.MilterPlan, result, queue_id: str, t0: float):
        """Bookkeeping after the plan was applied: counters, queue id, quarantine events (a
        coroutine returned for the engine to run on the loop, or None), the log line."""
        srv = self.server
        tx = self.tx
        srv.count("messages")
        ctx = tx.ctx
        after = None
        if ctx is not None:
            ctx.transaction.data["queue_id"] = queue_id
            if p.quarantined:
                reason = (result.outcomes[p.quarantined[0]].verdict.reason
                          if result is not None else "")
                after = srv.after_message(self.pipeline, ctx, p, reason)
        if log.isEnabledFor(logging.INFO):
            log.info("milter qid=%s id=%s from=<%s> rcpts=%d size=%d %s (%.1f ms)",
                     queue_id or "-", ctx.transaction.id if ctx is not None else "-",
                     tx.sender, len(tx.rcpt_raw), self.size, p.summary(),
                     (time.monotonic() - t0) * 1000)
        return after

    def _message(self) -> tuple[Message, list[tuple[str, str]]]:
        """The message as received (its header fields kept as the MTA sent them, so that
        parsing it skips the header block) and its headers as text."""
        nl = b"\r\n"
        sep = b":" if self.leadspc else b": "
        parts = []
        fields = []
        hdrs = []
        for name, value in self.headers:
            name_b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
            v = value.replace(b"\r\n", b"\n").replace(b"\n", nl)
            parts.append(name_b + sep + v + nl)
            fields.append((name_b, v))
            hdrs.append((name_b.decode("utf-8", "surrogateescape"),
                         v.decode("utf-8", "surrogateescape")))
        return Message(b"".join(parts) + nl + b"".join(self.chunks), fields), hdrs

    def operations(self, p: milter_actions.MilterPlan, tx: TxState):
        """A "continue" plan as the milter operations that carry it out, in order:
        ("delrcpt", rcpt), ("chgheader", name, index, value), ("insheader", name, value) at the
        top, ("addheader", name, value) at the bottom, ("replbody", chunk),
        ("quarantine", reason). Raises when the MTA did not allow one of them."""
        lead = " " if self.leadspc else ""

        def need(flag: int, what: str) -> None:
            if not self.actions & flag:
                raise RuntimeError(f"the MTA did not allow the milter to {what} (negotiated "
                                   f"actions 0x{self.actions:x})")

        for addr in p.delete_rcpts:
            raw_rcpt = tx.rcpt_raw.get(addr.lower())
            if raw_rcpt is None:
                # a recipient a plugin added or rewrote (aliases): the MTA's envelope does not
                # have it, and the MTA does its own alias expansion
                log.info("milter: outcome for <%s> not applied: not an envelope recipient", addr)
                continue
            need(P.F_DELRCPT, "remove recipients")
            yield ("delrcpt", raw_rcpt)
        for name, idx, value in p.change_headers:
            need(P.F_CHGHDRS, "change headers")
            yield ("chgheader", name, idx, (lead + value) if value else "")
        if p.add_headers:
            need(P.F_ADDHDRS, "add headers")
        if self.server.settings.header_position == "top":
            for name, value in reversed(p.add_headers):
                yield ("insheader", name, lead + value)
        else:
            for name, value in p.add_headers:
                yield ("addheader", name, lead + value)
        if p.replace_body is not None:
            need(P.F_CHGBODY, "replace the body")
            body = p.replace_body
            for i in range(0, len(body), 65535):
                yield ("replbody", body[i:i + 65535])
            if not body:
                yield ("replbody", b"")
        if p.hold_reason:
            need(P.F_QUARANTINE, "quarantine (hold) the message")
            yield ("quarantine", p.hold_reason)


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
    if settings.engine == "native":
        from .. import eventloop
        from . import native

        eventloop.loop_factory(settings.event_loop)  # uvloop asked for but missing: say so now
        sock = native.listen_socket(settings)

        def serve() -> int:
            return native.serve_one(settings, sock, config_path, overrides, use_default_path)
    else:
        from . import libmilter

        libmilter.register(settings)
        libmilter.open_socket(settings)

        def serve() -> int:
            return libmilter.serve_one(settings, config_path, overrides, use_default_path)
    print(f"filterd: ready: milter on {settings.listen}", file=sys.stderr, flush=True)
    if settings.workers <= 1:
        try:
            return serve()
        finally:
            _remove_socket(settings)
    return _supervise(settings, serve)


def _remove_socket(settings: MilterSettings) -> None:
    if settings.listen.startswith(("unix:", "local:")):
        try:
            os.unlink(settings.listen.split(":", 1)[1])
        except OSError:
            pass


def _supervise(settings: MilterSettings, serve) -> int:
    """Fork ``settings.workers`` processes that each run ``serve()`` on the socket opened
    before; restart one that dies, forward SIGTERM/SIGINT/SIGHUP."""
    children: dict[int, int] = {}
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = serve()
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
    loop and with THIS pipeline, until cancelled (or, with the pymilter engine, until libmilter
    stops). One process: ``[milter] workers`` applies to ``filterd milter`` only.
    Returns at once when no milter socket is configured (``[milter] listen`` = "" and no
    ``listen`` argument). Prints ``filterd: ready: milter on SPEC`` to stderr when listening."""
    global _SERVER
    settings = MilterSettings.from_config(config, listen, 1)
    if not settings.listen:
        return
    check_listen(settings.listen)
    if settings.engine == "native":
        from . import native

        sock = native.listen_socket(settings)
        _SERVER = MilterServer(settings, pipeline, None)
        listener = await native.Listener(_SERVER, sock).start()
        print(f"filterd: ready: milter on {settings.listen}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            listener.close()
            _remove_socket(settings)
        return
    from . import libmilter

    _SERVER = MilterServer(settings, pipeline, libmilter.LoopThread(asyncio.get_running_loop()))
    await libmilter.serve_in_loop(_SERVER)
