"""filterd's own milter protocol code (filterd/milter/protocol.py) and the native engine's I/O.

The behaviour both engines share (verdicts, actions, bad input, Postfix end to end) is tested
once per engine in test_milter_badinput.py and test_milter_postfix.py; here is what only the
native engine has: its framing, its ordering of commands that arrive while the pipeline works,
and its idle timeout."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from conftest import GTUBE
from milter_client import ALL_ACTIONS, ALL_PROTO, NR_FOR, SKIP_FOR, MilterClient
from milter_support import ROOT, FilterdMilterProc

from filterd.milter import protocol as P

CLEAN_HEADERS = [("From", "Alice <alice@example.com>"), ("To", "bob@example.org"),
                 ("Subject", "hello"), ("Message-ID", "<native-1@example.com>")]
FINAL = (b"a", b"c", b"r", b"t", b"d", b"y")


# -- the codec --------------------------------------------------------------------------------
def test_reply_code_is_libmilters_single_and_multi_line_reply():
    assert P.reply_code(550, "5.7.1", "Message rejected as spam") == P.packet(
        b"y", b"550 5.7.1 Message rejected as spam\0")
    assert P.reply_code(451, "4.3.0", "first\nsecond") == P.packet(
        b"y", b"451-4.3.0 first\r\n451 4.3.0 second\0")
    assert P.reply_code(550, "", "no enhanced code") == P.packet(b"y", b"550 no enhanced code\0")


def test_connect_and_macro_packets_are_parsed():
    v4 = b"mx.example\0" + b"4" + struct.pack("!H", 2525) + b"192.0.2.1\0"
    assert P.parse_connect(v4) == ("mx.example", "4", 2525, "192.0.2.1")
    v6 = b"[2001:db8::1]\0" + b"6" + struct.pack("!H", 25) + b"2001:db8::1\0"
    assert P.parse_connect(v6) == ("[2001:db8::1]", "6", 25, "2001:db8::1")
    assert P.parse_connect(b"localhost\0U/run/sock\0")[1:] == ("U", 0, "/run/sock")
    assert P.parse_connect(b"unknown\0")[1] == "U"
    assert P.parse_macros(b"Mi\0ABC123\0{auth_authen}\0alice\0") == (
        b"M", {"i": "ABC123", "auth_authen": "alice"})
    assert P.optneg_reply(1, 2, {P.M_EOM: "i"}) == P.packet(
        b"O", struct.pack("!IIII", 6, 1, 2, P.M_EOM) + b"i\0")


class Recorder(P.MilterConnection):
    """Records what the framing dispatches; a fake transport collects what it writes."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.out = b""
        self.aborted = False

        class T:
            def write(t, data):
                self.out += data

            def close(t):
                self.aborted = True

            def get_extra_info(t, name):
                return None

        self.connection_made(T())

    def on_header(self, data):
        self.calls.append(("L", data))

    def on_body(self, data):
        self.calls.append(("B", data))


def stream() -> bytes:
    return (P.packet(b"L", b"Subject\0 hi\0") + P.packet(b"B", b"x" * 70000)
            + P.packet(b"L", b"To\0 bob\0"))


def test_packets_split_anywhere_are_dispatched_whole_and_in_order():
    whole = Recorder()
    whole.data_received(stream())
    bytewise = Recorder()
    for i in range(len(stream())):
        bytewise.data_received(stream()[i:i + 1])
    assert whole.calls == bytewise.calls == [("L", b"Subject\0 hi\0"), ("B", b"x" * 70000),
                                             ("L", b"To\0 bob\0")]
    assert not bytewise.buf and not bytewise.aborted


@pytest.mark.parametrize("garbage", [b"\0\0\0\0", b"\xff\xff\xff\xffL", P.packet(b"Z", b"?")],
                         ids=["zero-length", "huge-length", "unknown-command"])
def test_a_packet_that_is_not_the_milter_protocol_closes_the_connection(garbage):
    r = Recorder()
    r.data_received(P.packet(b"L", b"Subject\0 ok\0") + garbage + P.packet(b"L", b"X\0 y\0"))
    assert r.calls == [("L", b"Subject\0 ok\0")]
    assert r.aborted and r.closed


def test_commands_written_during_a_step_wait_for_it_and_only_a_flood_pauses_reading():
    """What the MTA writes while a step runs (it should wait for the answer) is kept and handled
    after the step, in order; reading pauses only once that is more than a packet's maximum."""

    class Slow(Recorder):
        def __init__(self):
            super().__init__()
            self.go = asyncio.Event()
            self.reading = []

            def pause():
                self.reading.append("paused")

            def resume():
                self.reading.append("resumed")
            self.transport.pause_reading = pause
            self.transport.resume_reading = resume

        def on_eom(self, data):
            async def step():
                await self.go.wait()
                self.calls.append(("E", data))
            return step()

    async def run(flood: bool):
        s = Slow()
        s.connection_made(s.transport)  # the running loop, for the step's task
        s.data_received(P.packet(b"L", b"A\0 1\0") + P.packet(b"E") + P.packet(b"L", b"B\0 2\0"))
        s.data_received(P.packet(b"B", b"x" * 600_000))
        if flood:
            s.data_received(P.packet(b"B", b"y" * 600_000))
        await asyncio.sleep(0)
        assert s.calls == [("L", b"A\0 1\0")]  # the rest waits for the step
        s.go.set()
        while s.waiting is not None:
            await asyncio.sleep(0)
        assert [c[0] for c in s.calls] == ["L", "E", "L", "B"] + (["B"] if flood else [])
        return s.reading

    assert asyncio.run(run(flood=False)) == []
    assert asyncio.run(run(flood=True)) == ["paused", "resumed"]


# -- the native engine end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def native_milter():
    m = FilterdMilterProc("spam_headers.add=always", engine="native")
    yield m
    m.stop()


def transaction(sender: str, body: bytes) -> list[tuple[bytes, bytes]]:
    cmds = [(b"M", f"<{sender}>".encode() + b"\0"), (b"R", b"<bob@example.org>\0")]
    cmds += [(b"L", n.encode() + b"\0 " + v.encode() + b"\0") for n, v in CLEAN_HEADERS]
    return cmds + [(b"N", b""), (b"B", body), (b"E", b"")]


def replies_in_order(c: MilterClient, cmds) -> list[list[tuple[bytes, bytes]]]:
    """The replies to ``cmds`` (sent already), grouped per command that gets one."""
    out = []
    for cmd, _ in cmds:
        if cmd in SKIP_FOR and c.protocol & SKIP_FOR[cmd] or cmd in NR_FOR and \
                c.protocol & NR_FOR[cmd] or cmd in (b"D", b"Q"):
            continue
        group = [c.read()]
        while cmd == b"E" and group[-1][0] not in FINAL:
            group.append(c.read())
        out.append(group)
    return out


def test_commands_sent_ahead_wait_for_the_message_before_them(native_milter):
    """An MTA (or a hostile client) may write the next transaction before filterd answered the
    previous end of message: it must be read only after that answer, in order, so each message
    gets its own verdict."""
    c = MilterClient(native_milter.port)
    c.negotiate()
    cmds = [(b"C", b"client.example\0" + b"4" + struct.pack("!H", 4321) + b"192.0.2.10\0"),
            (b"H", b"client.example\0")]
    cmds += transaction("spammer@example.com", f"{GTUBE}\r\n".encode())
    cmds += transaction("alice@example.com", b"A clean body.\r\n")
    c.sock.sendall(b"".join(P.packet(cmd, data) for cmd, data in cmds
                            if not (cmd in SKIP_FOR and c.protocol & SKIP_FOR[cmd])))
    groups = replies_in_order(c, cmds)
    c.quit()
    eoms = [g for g in groups if len(g) > 1 or g[0][0] not in (b"c",)]
    assert eoms[0][-1][0] == b"y" and eoms[0][-1][1].startswith(b"550 5.7.1"), groups
    assert eoms[1][-1][0] == b"c" and any(cmd == b"i" for cmd, _ in eoms[1]), groups


class Trickle(MilterClient):
    """Writes every packet one byte per segment, as a very slow network would deliver it."""

    def send(self, cmd: bytes, data: bytes = b"") -> None:
        for b in P.packet(cmd, data):
            self.sock.sendall(bytes([b]))


def test_a_session_written_one_byte_at_a_time_gets_the_same_answer(native_milter):
    c = Trickle(native_milter.port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.negotiate()
    replies = c.message("spammer@example.com", ["bob@example.org"], CLEAN_HEADERS,
                        f"{GTUBE}\r\n".encode())
    c.quit()
    assert replies[-1][0] == b"y" and replies[-1][1].startswith(b"550 5.7.1"), replies


def test_a_silent_mta_connection_is_closed_after_io_timeout():
    m = FilterdMilterProc("milter.io_timeout=1s", engine="native")
    try:
        c = MilterClient(m.port, timeout=20)
        c.negotiate()
        t0 = time.monotonic()
        assert c.sock.recv(1) == b""  # closed by filterd, not by our own timeout
        assert time.monotonic() - t0 < 19
        assert "io_timeout" in m.log()
        others = MilterClient(m.port)  # the milter itself goes on
        others.negotiate()
        replies = others.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                                 b"Still here.\r\n")
        others.quit()
        assert replies[-1][0] == b"c", replies
    finally:
        m.stop()


def test_a_body_chunk_riding_on_end_of_message_is_scanned_and_gets_one_answer(native_milter):
    """The protocol allows the last body chunk inside SMFIC_BODYEOB; it is part of the message,
    and the MTA gets exactly one answer (a second one would desynchronise the connection)."""
    c = MilterClient(native_milter.port)
    # an MTA without "no reply" for body chunks: a chunk in a B packet would be answered
    c.send(b"O", struct.pack("!III", 6, ALL_ACTIONS, ALL_PROTO & ~P.P_NR_BODY))
    _, data = c.read()
    _, c.actions, c.protocol = struct.unpack("!III", data[:12])
    assert not c.protocol & P.P_NR_BODY
    c.connect()
    c.helo()
    c.mail("spammer@example.com")
    c.rcpt("bob@example.org")
    for n, v in CLEAN_HEADERS:
        c.header(n, v)
    c.eoh()
    c.send(b"E", f"{GTUBE}\r\n".encode())
    replies = [c.read()]
    while replies[-1][0] not in FINAL:
        replies.append(c.read())
    assert replies[-1][0] == b"y" and replies[-1][1].startswith(b"550 5.7.1"), replies
    c.send(b"A")  # abort: no answer; the connection must still be in step
    replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                        b"A clean body.\r\n")
    c.quit()
    assert replies[-1][0] == b"c", replies


# -- the event loop ([milter] event_loop) -------------------------------------------------------
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_milter_gives_the_same_verdicts_on_uvloop_and_on_asyncios_own_loop(loop):
    m = FilterdMilterProc(f"milter.event_loop={loop}", engine="native")
    try:
        for sender, body, final in (("spammer@example.com", f"{GTUBE}\r\n", b"y"),
                                    ("alice@example.com", "A clean body.\r\n", b"c")):
            c = MilterClient(m.port)
            c.negotiate()
            replies = c.message(sender, ["bob@example.org"], CLEAN_HEADERS, body.encode())
            c.quit()
            assert replies[-1][0] == final, replies
        assert f"native engine on {loop}" in m.log()
    finally:
        m.stop()


def test_uvloop_asked_for_but_not_importable_stops_start_up_with_the_remedy(tmp_path):
    """"auto" falls back to asyncio's loop; "uvloop" says what is missing before listening."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "uvloop.py").write_text("raise ImportError('uvloop removed for this test')\n")
    (tmp_path / "empty.toml").write_text("")
    env = dict(os.environ, PYTHONPATH=f"{shadow}{os.pathsep}{ROOT}")
    cmd = [sys.executable, "-m", "filterd", "milter", "--listen", "inet:1@127.0.0.1",
           "--config", str(tmp_path / "empty.toml"), "--set", f"server.state_dir={tmp_path}",
           "--set", "milter.event_loop=uvloop"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "uvloop cannot be imported" in p.stderr and "pip install uvloop" in p.stderr, p.stderr
    assert "ready" not in p.stderr

    m = FilterdMilterProc("milter.event_loop=auto", engine="native",
                          env={"PYTHONPATH": env["PYTHONPATH"]})
    try:
        c = MilterClient(m.port)
        c.negotiate()
        replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS, b"Hi.\r\n")
        c.quit()
        assert replies[-1][0] == b"c", replies
        assert "native engine on asyncio" in m.log()
    finally:
        m.stop()
