"""Milter mode against hostile or broken MTA-side input, driven by a raw milter-protocol client
(tests/milter_client.py) and by Debian's miltertest: the milter never crashes, the bad session
gets a clear answer (or is dropped), and other sessions go on unaffected."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GTUBE
from milter_client import MilterClient
from milter_support import FilterdMilterProc

DATA = Path(__file__).parent / "data" / "milter"
CLEAN_HEADERS = [("From", "Alice <alice@example.com>"), ("To", "bob@example.org"),
                 ("Subject", "hello"), ("Date", "Fri, 27 Nov 2026 08:00:00 +0000"),
                 ("Message-ID", "<bad-input@example.com>")]


pytestmark = pytest.mark.usefixtures("milter_engine")


@pytest.fixture(scope="module")
def milter_proc(milter_engine):
    m = FilterdMilterProc("milter.max_size=100KB", "milter.oversize=reject",
                          "spam_headers.add=always")
    yield m
    m.stop()


def clean_session(port: int) -> list:
    c = MilterClient(port)
    try:
        c.negotiate()
        return c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                         b"A clean body.\r\n")
    finally:
        c.quit()


def plugin_milter(tmp_path, name: str, source: str, *overrides: str) -> FilterdMilterProc:
    """A filterd milter with one extra site plugin (``source`` as ``plugins/<name>.py``)."""
    plugdir = tmp_path / "plugins"
    plugdir.mkdir(exist_ok=True)
    (plugdir / f"{name}.py").write_text(source)
    return FilterdMilterProc(f"plugins.site_dir={plugdir}", *overrides)


def final(replies) -> bytes:
    return replies[-1][0]


def assert_healthy(m: FilterdMilterProc) -> None:
    assert m.alive(), m.log()[-3000:]
    replies = clean_session(m.port)
    assert final(replies) in (b"c", b"a"), replies
    assert any(cmd in (b"h", b"i") and b"X-Spam-Status" in data for cmd, data in replies)


async def test_negotiation_requests_only_needed_steps_and_actions(milter_proc, pipeline_factory):
    c = MilterClient(milter_proc.port)
    c.negotiate()
    c.quit()
    import milter as M
    # no EOH / DATA / unknown callbacks; headers and body without per-packet replies
    for bit in (M.P_NOEOH, M.P_NODATA, M.P_NOUNKNOWN, M.P_NR_HDR, M.P_NR_BODY):
        assert c.protocol & bit
    # an early step waits for a reply exactly when some plugin may want to answer there
    pipe = await pipeline_factory()
    for hook, bit in (("connect", M.P_NR_CONN), ("helo", M.P_NR_HELO),
                      ("rcpt_to", M.P_NR_RCPT)):
        assert bool(c.protocol & bit) == (not pipe.host.wants(hook)), hook
    assert not pipe.host.wants("connect") and pipe.host.impls("rcpt_to")
    # [milter] delay_reject: MAIL FROM, which the default plugins may refuse (ratelimit), is
    # answered at RCPT TO, which waits for a reply anyway
    assert pipe.host.wants("mail_from") and pipe.host.wants("rcpt_to")
    assert c.protocol & M.P_NR_MAIL and not c.protocol & M.P_NR_RCPT
    assert not c.protocol & (M.P_NOCONNECT | M.P_NOHDRS | M.P_NOBODY | M.P_RCPT_REJ)
    assert c.actions & (M.ADDHDRS | M.CHGHDRS | M.DELRCPT | M.QUARANTINE)
    assert not c.actions & (M.ADDRCPT | M.CHGFROM)


def test_gtube_over_the_raw_protocol_gets_filterds_reply(milter_proc):
    c = MilterClient(milter_proc.port)
    c.negotiate()
    replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                        f"spam {GTUBE}\r\n".encode())
    c.quit()
    cmd, data = replies[-1]
    assert cmd == b"y"
    assert data.startswith(b"550 5.7.1 Message rejected as spam")


def test_changes_the_mta_did_not_allow_follow_the_error_policy(milter_proc):
    """An MTA that does not let the milter add headers (it offers only body replacement):
    filterd cannot add its headers, and says so with the error policy (451 4.3.0) instead of
    passing the message unmarked."""
    import struct

    from milter_client import ALL_PROTO

    c = MilterClient(milter_proc.port)
    c.send(b"O", struct.pack("!III", 6, 0x02, ALL_PROTO))  # SMFIF_CHGBODY only
    cmd, data = c.read()
    _, c.actions, c.protocol = struct.unpack("!III", data[:12])
    assert c.actions == 0x02
    replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                        b"A clean body.\r\n")
    c.quit()
    assert replies[-1][0] == b"y" and replies[-1][1].startswith(b"451 4.3.0"), replies
    assert "milter internal error" in milter_proc.log()
    assert_healthy(milter_proc)


def test_client_disconnecting_mid_message_leaves_other_sessions_working(milter_proc):
    other = MilterClient(milter_proc.port)  # a session in progress during the disconnects
    other.negotiate()
    other.connect()
    other.mail("alice@example.com")
    other.rcpt("bob@example.org")
    for cut in ("after-mail", "after-headers", "mid-body"):
        c = MilterClient(milter_proc.port)
        c.negotiate()
        c.connect()
        c.helo()
        c.mail("alice@example.com")
        if cut != "after-mail":
            c.rcpt("bob@example.org")
            for n, v in CLEAN_HEADERS:
                c.header(n, v)
        if cut == "mid-body":
            c.eoh()
            c.send(b"B", b"partial body with no end")
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
    replies = other.content(CLEAN_HEADERS, b"Still here.\r\n")
    other.quit()
    assert final(replies) in (b"c", b"a"), replies
    assert_healthy(milter_proc)


def test_oversized_headers_get_a_clear_answer(milter_proc):
    # 300 headers of 1000 bytes: past [milter] max_size (100K) -> oversize = reject
    c = MilterClient(milter_proc.port)
    c.negotiate()
    headers = CLEAN_HEADERS + [(f"X-Big-{i}", "v" * 1000) for i in range(300)]
    replies = c.message("alice@example.com", ["bob@example.org"], headers, b"body\r\n")
    c.quit()
    assert replies[-1][0] == b"y"
    assert replies[-1][1].startswith(b"552 5.3.4")
    # one header larger than libmilter's packet limit: libmilter drops that connection only
    c = MilterClient(milter_proc.port)
    c.negotiate()
    c.connect()
    c.mail("alice@example.com")
    c.rcpt("bob@example.org")
    try:
        c.header("X-Huge", "h" * 300_000)
        c.eoh()
        c.body(b"x\r\n")
        c.eom()
    except (ConnectionError, OSError):
        pass
    c.close()
    assert_healthy(milter_proc)


def test_body_over_the_limit_is_refused_as_configured(milter_proc):
    c = MilterClient(milter_proc.port)
    c.negotiate()
    replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                        b"0123456789abcdef" * 20_000)  # 320 KB > 100K
    c.quit()
    assert replies[-1][0] == b"y"
    assert replies[-1][1].startswith(b"552 5.3.4 Message too large")
    assert_healthy(milter_proc)


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xffjunk",                       # absurd length
    b"\x00\x00\x00\x05Zabcd",                       # unknown command
    b"\x00\x00\x00\x00",                            # zero length
    b"GET / HTTP/1.0\r\n\r\n",                      # not the milter protocol at all
])
def test_garbage_packets_drop_only_that_connection(milter_proc, garbage):
    other = MilterClient(milter_proc.port)
    other.negotiate()
    other.connect()
    other.mail("alice@example.com")
    other.rcpt("bob@example.org")
    bad = socket.create_connection(("127.0.0.1", milter_proc.port), 5)
    bad.sendall(garbage)
    bad.settimeout(5)
    try:
        bad.recv(100)
    except OSError:
        pass
    bad.close()
    # garbage in the middle of a negotiated session too
    mid = MilterClient(milter_proc.port)
    mid.negotiate()
    mid.connect()
    mid.sock.sendall(garbage)
    mid.close()
    replies = other.content(CLEAN_HEADERS, b"fine\r\n")
    other.quit()
    assert final(replies) in (b"c", b"a"), replies
    assert_healthy(milter_proc)


@pytest.mark.skipif(not shutil.which("miltertest"), reason="miltertest not installed")
def test_miltertest_drives_the_same_cases(tmp_path):
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f'[rules]\nsite_dir = "{DATA / "rules"}"\n'
                   f'[plugins]\nsite_dir = "{DATA / "plugins"}"\n[spam_headers]\nadd = "always"\n')
    m = FilterdMilterProc(config=str(cfg))
    try:
        r = subprocess.run(["miltertest", "-s", str(DATA / "miltertest.lua")],
                           env={**os.environ, "MILTER_SOCK": f"inet:{m.port}@127.0.0.1"},
                           capture_output=True, timeout=120)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        assert r.returncode == 0, out + m.log()[-3000:]
        assert "all cases passed" in out
    finally:
        m.stop()


SERVE_SCRIPT = r'''
import asyncio, sys
from filterd.pipeline import Pipeline
from filterd.milter import run_milter_from_config

async def main(port, state, engine):
    pipe = await Pipeline.create(None, [f"server.state_dir={state}", f"milter.engine={engine}"],
                                 use_default_path=False)
    try:
        await asyncio.wait_for(
            run_milter_from_config(pipe.config, pipe, f"inet:{port}@127.0.0.1"), 6)
    except asyncio.TimeoutError:
        print("milter stopped on cancellation", flush=True)
    finally:
        await pipe.close()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
'''


def test_run_milter_from_config_serves_on_the_callers_loop_and_stops_on_cancel(tmp_path,
                                                                              milter_engine):
    """The entry point `filterd serve` uses: the caller's loop and pipeline, stopped by
    cancelling the task."""
    import sys

    from milter_support import free_port, wait_port
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port), str(tmp_path),
                             milter_engine],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, 20, proc=proc)
        c = MilterClient(port)
        c.negotiate()
        replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                            f"{GTUBE}\r\n".encode())
        c.quit()
        assert replies[-1][0] == b"y" and replies[-1][1].startswith(b"550 5.7.1")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert b"milter stopped on cancellation" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


LIVE_PLUGIN = '''
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict
CONFIG = ""

@hookimpl
def mail_from(ctx, sender):
    if sender.startswith("blocked@"):
        return Verdict.reject("Sender blocked by test policy", code=550, enhanced="5.7.1")

@hookimpl
def rcpt_to(ctx, recipient):
    if recipient.address.startswith("nobody@"):
        return Verdict.reject("No such user here", code=550, enhanced="5.1.1")
'''


def test_a_plugin_with_early_hooks_rejects_at_mail_and_rcpt_time(tmp_path):
    """When a plugin implements mail_from/rcpt_to, those steps wait for the pipeline and a
    reject happens at MAIL/RCPT with filterd's reply, like on the SMTP gateway (with
    ``delay_reject = false``; see the next test for the default)."""
    import milter as M
    m = plugin_milter(tmp_path, "early", LIVE_PLUGIN, "milter.delay_reject=false")
    try:
        c = MilterClient(m.port)
        c.negotiate()
        assert not c.protocol & (M.P_NR_MAIL | M.P_NR_RCPT)  # these now need replies
        assert c.protocol & M.P_NR_CONN  # nobody implements connect
        c.connect()
        c.helo()
        assert c.mail("alice@example.com") == (b"c", b"")
        cmd, data = c.rcpt("nobody@example.org")
        assert cmd == b"y" and data.startswith(b"550 5.1.1 No such user here")
        assert c.rcpt("bob@example.org") == (b"c", b"")
        assert c.content(CLEAN_HEADERS, b"fine\r\n")[-1][0] in (b"c", b"a")
        c.send(b"A")  # abort, then a second transaction on the same connection
        cmd, data = c.mail("blocked@example.com")
        assert cmd == b"y" and data.startswith(b"550 5.7.1 Sender blocked")
        c.quit()
        assert m.alive()
    finally:
        m.stop()


def test_delay_reject_answers_a_refused_sender_at_each_recipient(tmp_path):
    """``[milter] delay_reject`` (the default), as Postfix's smtpd_delay_reject: MAIL FROM
    gets no reply of its own (one round trip less per message), and a sender a plugin refuses
    is refused at every RCPT TO with filterd's reply; recipients are judged as before."""
    import milter as M
    m = plugin_milter(tmp_path, "early", LIVE_PLUGIN)
    try:
        c = MilterClient(m.port)
        c.negotiate()
        assert c.protocol & M.P_NR_MAIL and not c.protocol & M.P_NR_RCPT
        c.connect()
        c.helo()
        assert c.mail("alice@example.com") is None  # no reply: MAIL FROM runs at RCPT TO
        cmd, data = c.rcpt("nobody@example.org")
        assert cmd == b"y" and data.startswith(b"550 5.1.1 No such user here")
        assert c.rcpt("bob@example.org") == (b"c", b"")
        assert c.content(CLEAN_HEADERS, b"fine\r\n")[-1][0] in (b"c", b"a")
        c.send(b"A")
        assert c.mail("blocked@example.com") is None
        for rcpt in ("bob@example.org", "carol@example.org"):
            cmd, data = c.rcpt(rcpt)
            assert cmd == b"y" and data.startswith(b"550 5.7.1 Sender blocked"), rcpt
        c.quit()
        assert m.alive()
    finally:
        m.stop()


WANTS_PLUGIN = '''
from filterd.hookspecs import hookimpl
from filterd.verdict import Modification, Verdict
CONFIG = ""

class Plugin:
    def __init__(self, options, services):
        pass

    def wants(self, hook, session=None, address=None):
        # MAIL FROM never needs an answer at its step; RCPT TO only for "special" addresses
        if hook == "mail_from":
            return session is None
        return address is None or address.startswith("special")

    @hookimpl
    def mail_from(self, ctx, sender):
        ctx.data.setdefault("seen", []).append("mail:" + sender)

    @hookimpl
    def rcpt_to(self, ctx, recipient):
        ctx.data.setdefault("seen", []).append("rcpt:" + recipient.address)
        if recipient.address.startswith(("special-no", "late-no")):
            return Verdict.reject("Refused by test policy", code=550, enhanced="5.1.1")

    @hookimpl
    def modify(self, ctx):
        return [Modification.add_header("X-Seen", " ".join(ctx.data.get("seen", [])))]
'''


def test_phases_no_plugin_wants_now_are_answered_at_once_and_run_at_end_of_message(tmp_path):
    """``wants`` lets a plugin say an early hook has nothing to answer for this client or
    address: the milter replies at once and runs the hook at end of message; a recipient it does
    want is answered live, after the deferred phases before it ran in order."""
    m = plugin_milter(tmp_path, "picky", WANTS_PLUGIN)
    try:
        c = MilterClient(m.port)
        c.negotiate()
        c.connect()
        c.helo()
        assert c.mail("alice@example.com") is None  # answered at RCPT TO (delay_reject)
        assert c.rcpt("bob@example.org") == (b"c", b"")
        assert c.rcpt("late-no@example.org") == (b"c", b"")  # not wanted: refused later
        cmd, data = c.rcpt("special-no@example.org")  # wanted: refused at its step
        assert cmd == b"y" and data.startswith(b"550 5.1.1 Refused by test policy")
        assert c.rcpt("carol@example.org") == (b"c", b"")
        replies = c.content(CLEAN_HEADERS, b"fine\r\n")
        c.quit()
        # the late refusal removes that recipient at end of message, the others go on
        assert (b"-", b"<late-no@example.org>\0") in replies or \
            (b"-", b"late-no@example.org\0") in replies, replies
        seen = next(d for cmd, d in replies if cmd in (b"h", b"i") and b"X-Seen" in d)
        # every phase ran once, in SMTP order, the live ones and the deferred ones alike
        value = seen.rstrip(b"\0").rpartition(b"\0")[2]  # h: name\0value\0, i: index+same
        assert value.decode().split() == [
            "mail:alice@example.com", "rcpt:bob@example.org", "rcpt:late-no@example.org",
            "rcpt:special-no@example.org", "rcpt:carol@example.org"]
        assert replies[-1][0] in (b"c", b"a")
        assert m.alive()
    finally:
        m.stop()


SESSION_PLUGIN = '''
from filterd.hookspecs import hookimpl
from filterd.verdict import Modification
CONFIG = ""

@hookimpl
def modify(ctx, message):
    s = ctx.session
    return [Modification.add_header("X-Test-Session",
            f"ip={s.peer_ip} name={s.peer_name} helo={s.helo} tls={s.tls_version}/{s.tls_cipher} "
            f"auth={s.auth_user} door={s.front_door}")]
'''


def test_tls_and_auth_macros_reach_the_pipeline_session(tmp_path):
    m = plugin_milter(tmp_path, "session_probe", SESSION_PLUGIN)
    try:
        c = MilterClient(m.port)
        c.negotiate()
        c.connect("mx.client.example", "198.51.100.7")
        # {macro} names as Postfix sends them with milter_helo_macros / milter_mail_macros
        c.macros(b"H", **{"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384"})
        c.helo("mx.client.example")
        c.macros(b"M", **{"i": "4XyZ1", "{auth_type}": "PLAIN", "{auth_authen}": "alice"})
        c.mail("alice@example.com")
        c.rcpt("bob@example.org")
        replies = c.content(CLEAN_HEADERS, b"hi\r\n")
        c.quit()
        added = [d for cmd, d in replies if cmd in (b"h", b"i") and b"X-Test-Session" in d]
        assert added, replies
        text = added[0].decode()
        assert ("ip=198.51.100.7 name=mx.client.example helo=mx.client.example "
                "tls=TLSv1.3/TLS_AES_256_GCM_SHA384 auth=alice door=milter") in text
        # the MTA queue id is logged with the verdict (after the reply has gone out)
        assert "qid=4XyZ1" in m.wait_log("qid=4XyZ1")
    finally:
        m.stop()


def test_workers_share_a_unix_socket_and_stop_cleanly_on_sigterm(tmp_path):
    import signal
    import sys
    sock = tmp_path / "milter.sock"
    (tmp_path / "empty.toml").write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "filterd", "milter", "--config", str(tmp_path / "empty.toml"),
         "--set", f"server.state_dir={tmp_path}", "--listen", f"unix:{sock}", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline()
        assert line.startswith(b"filterd: ready: milter on unix:"), line
        assert oct(sock.stat().st_mode & 0o777) == "0o660"
        deadline = time.monotonic() + 30
        replies = None
        while time.monotonic() < deadline:  # workers build their pipelines after the socket
            try:
                c = MilterClient(str(sock))
                c.negotiate()
                replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                                    f"{GTUBE}\r\n".encode())
                c.quit()
                break
            except (ConnectionError, OSError):
                time.sleep(0.2)
        assert replies and replies[-1][0] == b"y" and replies[-1][1].startswith(b"550 5.7.1")
        for _ in range(6):  # several sessions, spread over the workers by the kernel
            assert final(clean_session(str(sock))) in (b"c", b"a")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode(errors="replace")
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_with_milter_flag_runs_the_milter_front_door(tmp_path, milter_engine):
    """`filterd serve --milter inet:PORT@HOST` (no SMTP listener): the same pipeline answers
    milter sessions; GTUBE gets filterd's reject and a clean message passes."""
    from gateway_fixtures import free_port as free

    port = free()
    state = tmp_path / "state"
    state.mkdir()
    log = state / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "filterd", "serve", "--milter",
         f"inet:{port}@127.0.0.1", "--set", f"server.state_dir={state}",
         "--set", f"milter.engine={milter_engine}"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while b"ready: milter on" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        replies = clean_session(port)
        assert final(replies) in (b"c", b"a"), replies
        c = MilterClient(port)
        c.negotiate()
        replies = c.message("alice@example.com", ["bob@example.org"], CLEAN_HEADERS,
                            f"{GTUBE}\r\n".encode())
        c.quit()
        code, data = replies[-1]
        assert code == b"y" and b"550" in data, replies  # filterd's own SMTP reply
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
