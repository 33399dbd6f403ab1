"""The milter wire protocol (version 6, as spoken by Postfix and Sendmail), for asyncio.

The protocol is small: every packet is a 4-byte big-endian length, a command byte and its data.
This module is the codec and one :class:`asyncio.Protocol` that frames packets and dispatches
them to ``on_*`` methods; it knows nothing about filterd's pipeline (``native.py`` does).
Constants keep libmilter's names (``mfdef.h``) so they can be looked up there.

Why our own and not libmilter: libmilter runs one thread per MTA connection and two system
calls per packet; at a few milliseconds of budget per message, handing each message from those
threads to the pipeline's event loop cost more than the protocol itself. Here the MTA's socket
is read by the pipeline's own loop, a whole message usually arrives in a few reads, and with the
"no reply" steps negotiated the milter writes once per message (at end of message).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import types

log = logging.getLogger("filterd.milter")
_Coroutine = types.CoroutineType
_HANDLERS: dict[type, dict] = {}  # MilterConnection subclass -> its command handlers

VERSION = 6
MAX_PACKET = 1024 * 1024 + 64  # Postfix sends body chunks of at most 64 KB; libmilter caps 1 MB

# commands, MTA -> milter (SMFIC_*)
C_ABORT, C_BODY, C_CONNECT, C_MACRO, C_BODYEOB = b"A", b"B", b"C", b"D", b"E"
C_HELO, C_QUIT_NC, C_HEADER, C_MAIL, C_EOH = b"H", b"K", b"L", b"M", b"N"
C_OPTNEG, C_QUIT, C_RCPT, C_DATA, C_UNKNOWN = b"O", b"Q", b"R", b"T", b"U"

# replies, milter -> MTA (SMFIR_*)
R_ADDRCPT, R_DELRCPT, R_ACCEPT, R_REPLBODY, R_CONTINUE = b"+", b"-", b"a", b"b", b"c"
R_DISCARD, R_CHGFROM, R_ADDHEADER, R_INSHEADER, R_CHGHEADER = b"d", b"e", b"h", b"i", b"m"
R_PROGRESS, R_QUARANTINE, R_REJECT, R_SKIP, R_TEMPFAIL, R_REPLYCODE = (
    b"p", b"q", b"r", b"s", b"t", b"y")

# actions the milter may take (SMFIF_*)
F_ADDHDRS, F_CHGBODY, F_ADDRCPT, F_DELRCPT = 0x01, 0x02, 0x04, 0x08
F_CHGHDRS, F_QUARANTINE, F_CHGFROM, F_ADDRCPT_PAR, F_SETSYMLIST = 0x10, 0x20, 0x40, 0x80, 0x100

# protocol steps (SMFIP_*): NO* = do not send that command, NR_* = send it, expect no reply
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT = 0x01, 0x02, 0x04, 0x08
P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = 0x10, 0x20, 0x40, 0x80
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
P_HDR_LEADSPC = 0x100000

# what an MTA that offers 0 supports (libmilter's SMFI_V1_ACTS, SMFI_V1_PROT)
V1_ACTIONS = F_ADDHDRS | F_CHGBODY | F_ADDRCPT | F_DELRCPT
V1_PROTOCOL = P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS

# macro stages for the symbol lists sent with the negotiation reply (SMFIM_*)
M_CONNECT, M_HELO, M_ENVFROM, M_ENVRCPT, M_DATA, M_EOM, M_EOH = range(7)

QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only

_LEN = struct.Struct(">I")
OPTNEG = struct.Struct(">III")


class ProtocolError(Exception):
    """The peer sent something that is not the milter protocol (the connection is closed)."""


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return _LEN.pack(len(data) + 1) + cmd + data


def cstrings(data: bytes) -> list[bytes]:
    """NUL-terminated strings in ``data`` (the last NUL optional)."""
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0") if data else []


def optneg_reply(actions: int, protocol: int, macros: dict[int, str] | None = None,
                 version: int = VERSION) -> bytes:
    """The negotiation reply: our version (never above the MTA's), the actions and protocol
    steps we take, and the macro lists we want per stage (protocol 6)."""
    body = OPTNEG.pack(min(version, VERSION), actions, protocol)
    for stage, names in (macros or {}).items():
        body += _LEN.pack(stage) + names.encode() + b"\0"
    return packet(C_OPTNEG, body)


def reply_code(code: int | str, enhanced: str | None, text: str) -> bytes:
    """SMFIR_REPLYCODE ``550 5.7.1 text``; text with line breaks becomes a multi-line reply,
    as libmilter's ``smfi_setmlreply`` builds it. A ``%`` must already be doubled (the MTA
    formats the text; :func:`filterd.milter.actions.reply_of` does it)."""
    lines = (text or "").replace("\r", "").split("\n")
    enh = f"{enhanced} " if enhanced else ""
    last = len(lines) - 1
    out = "\r\n".join(f"{code}{'-' if i < last else ' '}{enh}{ln}" for i, ln in enumerate(lines))
    return packet(R_REPLYCODE, out.encode("utf-8", "surrogateescape") + b"\0")


def header_packet(cmd: bytes, name: str, value: str, index: int | None = None) -> bytes:
    data = b"" if index is None else _LEN.pack(index)
    return packet(cmd, data + name.encode("utf-8", "surrogateescape") + b"\0"
                  + value.encode("utf-8", "surrogateescape") + b"\0")


def parse_connect(data: bytes) -> tuple[str, str, int, str]:
    """SMFIC_CONNECT -> (hostname, family '4'/'6'/'U'/'L', port, address)."""
    host, _, rest = data.partition(b"\0")
    if not rest:
        return host.decode("utf-8", "replace"), "U", 0, ""
    family = chr(rest[0])
    if family in "46" and len(rest) >= 3:
        port = int.from_bytes(rest[1:3], "big")
        addr = rest[3:].rstrip(b"\0").decode("ascii", "replace")
    else:
        port, addr = 0, rest[1:].rstrip(b"\0").decode("utf-8", "replace")
    return host.decode("utf-8", "replace"), family, port, addr


def parse_macros(data: bytes) -> tuple[bytes, dict[str, str]]:
    """SMFIC_MACRO -> (the command the macros belong to, {name: value}); names lose their
    braces ("{auth_authen}" and "auth_authen" are the same macro)."""
    if not data:
        return b"", {}
    parts = cstrings(data[1:])
    out = {}
    for i in range(0, len(parts) - 1, 2):
        out[parts[i].decode("ascii", "replace").strip("{}")] = parts[i + 1].decode(
            "utf-8", "surrogateescape")
    return data[:1], out


class MilterConnection(asyncio.Protocol):
    """Frames packets from the MTA and calls ``on_<command>(data)``; a subclass answers with
    :meth:`send`. A handler may return a coroutine: the next command waits until it finished
    (what arrives meanwhile is kept; past a packet's maximum, reading pauses), so commands are
    handled strictly in order (as libmilter's one thread per connection does) while other
    connections go on. Unknown commands are a protocol error that closes the connection (the
    MTA's ``milter_default_action`` then decides), as libmilter does."""

    HANDLERS = {C_OPTNEG: "on_optneg", C_MACRO: "on_macro", C_CONNECT: "on_connect",
                C_HELO: "on_helo", C_MAIL: "on_mail", C_RCPT: "on_rcpt", C_DATA: "on_data",
                C_HEADER: "on_header", C_EOH: "on_eoh", C_BODY: "on_body",
                C_BODYEOB: "on_eom", C_ABORT: "on_abort", C_QUIT: "on_quit",
                C_QUIT_NC: "on_quit_nc", C_UNKNOWN: "on_unknown"}

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.waiting: asyncio.Future | None = None  # a handler's coroutine still running
        # command -> function, per class (bound methods built per connection were ~1 % of a
        # milter's work: Postfix opens a connection per SMTP session)
        cls = type(self)
        handlers = _HANDLERS.get(cls)
        if handlers is None:
            handlers = _HANDLERS[cls] = {c: getattr(cls, n) for c, n in cls.HANDLERS.items()}
        self._handlers = handlers
        self._ack_sock = None
        self._answered = False
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        # kept: asyncio.get_running_loop() (and so ensure_future) makes a getpid() system
        # call on Python 3.11, once per packet otherwise
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # driven by hand, outside a loop (unit tests)
            self._loop = None
        sock = transport.get_extra_info("socket")
        if QUICKACK is not None and sock is not None and sock.family != socket.AF_UNIX:
            self._ack_sock = sock

    def data_received(self, data: bytes) -> None:
        self._answered = False
        self.buf += data
        if self.waiting is None:
            self._drain()
        elif len(self.buf) > MAX_PACKET and not self._paused:
            # A step is running and the MTA goes on writing, though it waits for our answer
            # before its next command: keep the rest in its socket. (A well-behaved MTA never
            # gets here, so reading is not paused and resumed around every step: two system
            # calls each time.)
            self.transport.pause_reading()
            self._paused = True
        if self._ack_sock is not None and not self._answered and self.waiting is None \
                and not self.closed:
            # The MTA writes the commands it expects no reply to (macros, headers, body ...)
            # as separate small packets without TCP_NODELAY, so Nagle's algorithm holds each
            # one until our kernel ACKs the one before, which it delays by up to 40 ms when no
            # reply of ours carries the ACK. So when we answered nothing, ACK at once (Linux
            # sends a pending ACK when TCP_QUICKACK is set). A null milter behind Postfix went
            # from 410 to 540 msg/s at 20 sessions here (bench/milter_bench.py --native-floor).
            self._ack_sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiting is not None:
            self.waiting.cancel()

    def _drain(self) -> None:
        buf = self.buf
        pos, end = 0, len(buf)
        try:
            while end - pos >= 4 and not self.closed:
                n = _LEN.unpack_from(buf, pos)[0]
                if n == 0 or n > MAX_PACKET:
                    raise ProtocolError(f"bad packet length {n}")
                if end - pos - 4 < n:
                    break
                cmd = bytes(buf[pos + 4:pos + 5])
                payload = bytes(buf[pos + 5:pos + 4 + n])
                pos += 4 + n
                handler = self._handlers.get(cmd)
                if handler is None:
                    raise ProtocolError(f"unknown command {cmd!r}")
                step = handler(self, payload)
                if step is not None:  # a coroutine: the next command waits for it
                    del buf[:pos]
                    self.waiting = (self._loop.create_task(step) if type(step) is _Coroutine
                                    and self._loop is not None
                                    else asyncio.ensure_future(step))
                    self.waiting.add_done_callback(self._step_done)
                    return
        except ProtocolError as exc:
            self.protocol_error(str(exc))
            return
        del buf[:pos]

    def _step_done(self, fut: asyncio.Future) -> None:
        self.waiting = None
        if fut.cancelled() or self.closed:
            return
        exc = fut.exception()
        if exc is not None:  # handlers catch their own errors; this is a bug
            log.error("milter: handler failed: %r; closing the connection", exc)
            self.close()
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._drain()

    # -- helpers --------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self._answered = True
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def protocol_error(self, what: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning("milter: protocol error from %s: %s; closing the connection", peer or "?",
                    what)
        self.close()

    # -- defaults: a milter that accepts everything ---------------------------------------------
    def on_optneg(self, data: bytes) -> None:
        if len(data) < 12:
            raise ProtocolError("short option negotiation")
        self.send(optneg_reply(0, 0))

    def on_macro(self, data: bytes) -> None:
        pass

    def on_connect(self, data: bytes) -> None:
        self.send(packet(R_CONTINUE))

    on_helo = on_mail = on_rcpt = on_data = on_header = on_eoh = on_body = on_unknown = \
        on_connect

    def on_eom(self, data: bytes) -> None:
        self.send(packet(R_CONTINUE))

    def on_abort(self, data: bytes) -> None:
        pass

    def on_quit(self, data: bytes) -> None:
        self.close()

    def on_quit_nc(self, data: bytes) -> None:
        pass
