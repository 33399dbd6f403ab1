"""filterd's own milter engine: the milter protocol read by the pipeline's event loop.

The callbacks, negotiation, plans and error policy are :class:`~filterd.milter.server.
MilterSession`'s, shared with the pymilter engine (``libmilter.py``); this module is only the
I/O, on :mod:`filterd.milter.protocol`. There is no thread and no
hand-over: each MTA connection is an :class:`asyncio.Protocol` on the loop that runs the
pipeline. While a pipeline step runs for a connection (end of message, or an early phase a plugin
answers live) that connection's next commands wait, so they are handled strictly in order, as
libmilter's one thread per connection would.

``[milter] engine = "native"`` (the default) selects it, ``"pymilter"`` the libmilter engine.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time

from .. import eventloop
from ..model import Session
from . import actions as milter_actions
from . import protocol as P
from .server import REQUESTED_MACROS, MilterServer, MilterSession, MilterSettings

log = logging.getLogger("filterd.milter")

# the order in which macros are looked up: the latest stage first (libmilter's getsymval)
MACRO_STAGES = (P.C_BODYEOB, P.C_EOH, P.C_DATA, P.C_RCPT, P.C_MAIL, P.C_HELO, P.C_CONNECT)
TX_STAGES = (P.C_RCPT, P.C_DATA, P.C_EOH, P.C_BODYEOB)  # forgotten at each new MAIL

CONTINUE = P.packet(P.R_CONTINUE)
PLAIN = {"accept": P.packet(P.R_ACCEPT), "reject": P.packet(P.R_REJECT),
         "tempfail": P.packet(P.R_TEMPFAIL), "discard": P.packet(P.R_DISCARD)}
OPERATION = {"delrcpt": P.R_DELRCPT, "chgheader": P.R_CHGHEADER, "insheader": P.R_INSHEADER,
             "addheader": P.R_ADDHEADER, "replbody": P.R_REPLBODY, "quarantine": P.R_QUARANTINE}


def _encode_operation(op: str, *args) -> bytes:
    cmd = OPERATION[op]
    if op == "chgheader":
        return P.header_packet(cmd, args[0], args[2], args[1])
    if op == "insheader":
        return P.header_packet(cmd, args[0], args[1], 0)
    if op == "addheader":
        return P.header_packet(cmd, args[0], args[1])
    if op == "replbody":
        return P.packet(cmd, args[0])
    return P.packet(cmd, args[0].encode("utf-8", "surrogateescape") + b"\0")


class NativeMilterSession(MilterSession, P.MilterConnection):
    """One MTA connection: packets in, :class:`MilterSession` callbacks, packets out."""

    def __init__(self, server: MilterServer, registry: set | None = None):
        P.MilterConnection.__init__(self)
        MilterSession.__init__(self, server)
        self.macros: dict[bytes, dict[str, str]] = {}
        self._merged: dict[str, str] | None = None  # every stage's macros, the latest winning
        self.registry = registry  # the Listener's live sessions
        self.last_seen = 0.0

    # -- asyncio.Protocol: the Listener's registry and idle time -----------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.last_seen = self._loop.time()
        if self.registry is not None:
            self.registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self._loop.time()
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self.registry is not None:
            self.registry.discard(self)

    # -- engine (see MilterSession) -----------------------------------------------------------
    def _macro(self, name: str) -> str:
        merged = self._merged
        if merged is None:  # macros changed since the last look-up: merge, latest stage last
            merged = {}
            for stage in reversed(MACRO_STAGES):
                merged.update(self.macros.get(stage, ()))
            self._merged = merged
        return merged.get(name.strip("{}"), "")

    def _noreply(self) -> None:
        return None

    def _continue(self) -> None:
        self.send(CONTINUE)

    async def _early(self, coro, store: bool) -> None:
        """A coroutine: the framing waits for it before reading the next command."""
        try:
            async with asyncio.timeout(self.server.settings.timeout):  # (no task of its own)
                v = await coro
        except Exception as exc:  # noqa: BLE001
            log.exception("milter early phase failed")
            self._error(f"{type(exc).__name__}: {exc}")
            return
        reply = self._early_refusal(v, store)
        self.send(CONTINUE if reply is None else P.reply_code(*reply))

    def _reply_error(self, policy: str, reply) -> None:
        self.send(P.reply_code(*reply) if reply is not None else PLAIN[policy])

    # -- commands -------------------------------------------------------------------------------
    def on_optneg(self, data: bytes) -> None:
        if len(data) < 12:
            raise P.ProtocolError("short option negotiation")
        version, offered_actions, offered_proto = P.OPTNEG.unpack_from(data)
        if version < 2:
            raise P.ProtocolError(f"milter protocol version {version} is too old")
        # as libmilter: an MTA that names no actions or steps offers those of protocol 1
        actions, proto, symlist = self.choose(offered_actions or P.V1_ACTIONS,
                                              offered_proto or P.V1_PROTOCOL)
        self.send(P.optneg_reply(actions, proto, REQUESTED_MACROS if symlist and version >= 6
                                 else None, version))

    def on_macro(self, data: bytes) -> None:
        stage, values = P.parse_macros(data)
        self.macros.setdefault(stage, {}).update(values)
        self._merged = None

    def on_connect(self, data: bytes):
        host, family, port, addr = P.parse_connect(data)
        return self.connect(host, addr if family in "46" else None, port)

    def on_helo(self, data: bytes):
        return self.hello(data.rstrip(b"\0"))

    def on_mail(self, data: bytes):
        args = P.cstrings(data)
        if not args:
            raise P.ProtocolError("MAIL without an address")
        for stage in TX_STAGES:
            self.macros.pop(stage, None)
        self._merged = None
        return self.envfrom(*args)

    def on_rcpt(self, data: bytes):
        args = P.cstrings(data)
        if not args:
            raise P.ProtocolError("RCPT without an address")
        return self.envrcpt(*args)

    def on_header(self, data: bytes):
        name, _, value = data.partition(b"\0")
        return self.header_bytes(name, value[:-1] if value.endswith(b"\0") else value)

    def on_body(self, data: bytes):
        return self.body(data)

    def on_eoh(self, data: bytes) -> None:  # not negotiated; answered if an MTA sends it anyway
        self.send(CONTINUE)

    on_data = on_unknown = on_eoh

    def on_eom(self, data: bytes):
        if data:  # the last body chunk may ride on end of message (it gets no answer of its own)
            self.keep_body(data)
        return self._end_of_message()

    def on_abort(self, data: bytes) -> None:  # no answer (MilterSession.abort would give one)
        self._reset()

    def on_quit_nc(self, data: bytes) -> None:
        """The MTA reuses this connection for its next client: start afresh, negotiation kept."""
        self.session = Session(front_door="milter")
        self.macros = {}
        self._merged = None
        self.connect_pending = self.helo_pending = False
        self._reset()

    async def _end_of_message(self) -> None:
        srv = self.server
        s = srv.settings
        t0 = time.monotonic()
        try:
            if self.failure:
                self._error(self.failure)
                return
            queue_id, raw, headers = self.eom_input()
            async with asyncio.timeout(s.timeout):
                p, result = await srv.end_of_message(self.pipeline, self.tx, self.session, raw,
                                                     headers, self.truncated)
            self.send(self._encode(p))
        except asyncio.TimeoutError:
            self._error(f"pipeline did not finish within [milter] timeout {s.timeout:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never crash the connection
            log.exception("milter end of message failed")
            self._error(f"{type(exc).__name__}: {exc}")
        else:  # answered: the bookkeeping must not answer a second time
            try:
                after = self.eom_done(p, result, queue_id, t0)
                if after is not None:
                    asyncio.ensure_future(after)
            except Exception:  # noqa: BLE001
                log.exception("milter: bookkeeping after end of message failed")
        finally:
            self._reset()
            self.macros.pop(P.C_BODYEOB, None)
            self._merged = None

    def _encode(self, p: milter_actions.MilterPlan) -> bytes:
        """The plan as the packets that end the message (modifications, then the reply)."""
        if p.result in ("reject", "tempfail"):
            return P.reply_code(*p.reply) if p.reply else PLAIN[p.result]
        if p.result == "discard":
            return PLAIN["discard"]
        return b"".join([_encode_operation(*op) for op in self.operations(p, self.tx)]
                        + [CONTINUE])


# -- running ------------------------------------------------------------------------------------
def listen_socket(settings: MilterSettings) -> socket.socket:
    """The listening socket for ``[milter] listen`` (inet:PORT@HOST, inet6:PORT@HOST or
    unix:/path), opened before forking workers so they all serve it."""
    kind, _, rest = settings.listen.partition(":")
    if kind in ("unix", "local"):
        try:
            os.unlink(rest)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(rest)
        except OSError as exc:
            sock.close()
            raise OSError(f"milter: cannot listen on {settings.listen!r} ([milter] listen): "
                          f"{exc}") from exc
        os.chmod(rest, settings.socket_mode)
    else:
        port, _, host = rest.partition("@")
        family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
        host = host or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"milter: cannot listen on {settings.listen!r} ([milter] listen): "
                          f"{exc}; is another process using it?") from exc
        # several small packets end a message; without this each waits for a delayed ACK
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.listen(settings.backlog)
    sock.setblocking(False)
    return sock


class Listener:
    """Serves a listening socket on the running loop; closes connections from the MTA that
    stay silent longer than ``[milter] io_timeout`` (never one waiting for the pipeline)."""

    def __init__(self, server: MilterServer, sock: socket.socket):
        self.server, self.sock = server, sock
        self.sessions: set[NativeMilterSession] = set()
        self.aserver: asyncio.AbstractServer | None = None
        self.sweeper: asyncio.Task | None = None

    def _session(self) -> NativeMilterSession:
        return NativeMilterSession(self.server, self.sessions)

    async def start(self) -> "Listener":
        loop = asyncio.get_running_loop()
        self.aserver = await loop.create_server(self._session, sock=self.sock)
        self.sweeper = asyncio.ensure_future(self._sweep())
        return self

    async def _sweep(self) -> None:
        limit = self.server.settings.io_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(min(limit / 4, 30.0), 0.05))
            now = loop.time()
            for m in list(self.sessions):
                if m.waiting is None and now - m.last_seen > limit:
                    log.warning("milter: no command from the MTA for %gs ([milter] io_timeout); "
                                "closing the connection", limit)
                    m.close()

    def close(self) -> None:
        if self.sweeper is not None:
            self.sweeper.cancel()
        if self.aserver is not None:
            self.aserver.close()
        for m in list(self.sessions):
            m.close()


def serve_one(settings: MilterSettings, sock: socket.socket, config_path, overrides,
              use_default_path: bool) -> int:
    """One milter process: its own loop and pipeline serving ``sock`` until SIGTERM/SIGINT."""
    import signal

    from ..pipeline import Pipeline

    if settings.switch_interval > 0:
        sys.setswitchinterval(settings.switch_interval)

    async def main() -> None:
        pipeline = await Pipeline.create(config_path, overrides, use_default_path)
        server = MilterServer(settings, pipeline, None)
        srv = await Listener(server, sock).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("milter pid %d ready on %s (native engine on %s; early phases waiting for "
                 "plugins: %s)", os.getpid(), settings.listen, type(loop).__module__.split(".")[0],
                 ",".join(h for h, v in server.live.items() if v) or "none")
        try:
            await stop.wait()
        finally:
            srv.close()
            await pipeline.close()

    eventloop.run(main(), settings.event_loop)
    return 0
