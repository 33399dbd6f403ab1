"""The inbound listener against real clients (raw sockets, smtplib, swaks) with a real smtp-sink
downstream: ESMTP extensions, bad input, limits, relay control, per-recipient outcomes,
Received/hop count, signals."""
from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import time
import uuid

import pytest

from gateway_fixtures import Gateway, Raw, Sink, message, start_session, wait_for


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.stop()


SITE_PLUGIN = '''
"""Test plugin: the recipient's local part says what its outcome is."""
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict

@hookimpl
def decide(ctx):
    out = {}
    for r in ctx.recipients:
        lp = r.address.split("@")[0]
        if lp.startswith("reject"):
            out[r.address] = Verdict.reject("Rejected for this recipient", code=550,
                                            enhanced="5.7.1")
        elif lp.startswith("tempfail"):
            out[r.address] = Verdict.tempfail("Not now for this recipient")
        elif lp.startswith("quar"):
            out[r.address] = Verdict.quarantine("held for review")
        elif lp.startswith("discard"):
            out[r.address] = Verdict.discard("dropped on purpose")
    return out or None
'''


@pytest.fixture(scope="module")
def gw(tmp_path_factory, sink):
    base = tmp_path_factory.mktemp("gw")
    site = base / "site"
    site.mkdir()
    (site / "outcome_by_name.py").write_text(SITE_PLUGIN)
    g = Gateway(base, "--relayhost", f"127.0.0.1:{sink.port}",
                "--set", f"plugins.site_dir={site}",
                "--set", "smtp.max_message_size=200KB", "--set", "smtp.max_recipients=5",
                "--set", 'delivery.local_domains=["local.test"]',
                "--set", 'smtp.relay_domains=["relay.test"]',
                "--set", 'smtp.recipients=["known@relay.test", "@local.test"]')
    yield g
    g.stop()


@pytest.fixture(scope="module")
def closed_gw(tmp_path_factory, sink):
    """A gateway that does not trust loopback: relay only to its own domains."""
    g = Gateway(tmp_path_factory.mktemp("gwc"), "--relayhost", f"127.0.0.1:{sink.port}",
                "--mynetworks", "192.0.2.0/24",
                "--set", 'delivery.local_domains=["local.test"]',
                "--set", "smtp.command_timeout=2s", "--set", "smtp.data_timeout=2s",
                "--set", "smtp.max_sessions_per_ip=3")
    yield g
    g.stop()


def send(port, rcpts, data: str | bytes, sender="a@example.com") -> tuple[int, str]:
    r = start_session(port)
    assert r.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    for a in rcpts:
        c, t = r.cmd(f"RCPT TO:<{a}>")
        assert c == 250, t
    assert r.cmd("DATA")[0] == 354
    if isinstance(data, str):
        data = data.encode()
    r.send(data + b"\r\n.\r\n")
    res = r.reply()
    r.cmd("QUIT")
    r.close()
    return res


def at_sink(sink, token: str) -> list[bytes]:
    return [m for m in sink.messages() if token.encode() in m]


# ------------------------------------------------------------------------------- ESMTP ---------
def test_ehlo_announces_the_extensions(gw):
    r = Raw(gw.port)
    code, text = r.reply()
    assert code == 220 and "gw.test ESMTP" in text
    code, text = r.cmd("EHLO client.test")
    assert code == 250
    for ext in ("PIPELINING", "SIZE 204800", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"):
        assert ext in text
    assert "STARTTLS" not in text  # no certificate configured
    assert "AUTH" not in text
    r.close()


def test_message_is_relayed_to_the_sink_with_a_received_header(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["b@example.org"], message(token))
    assert code == 250 and "2.0.0" in text and "queued as" in text
    (m,) = wait_for(lambda: at_sink(sink, token), what="message at sink")
    head = m.split(b"\r\n\r\n")[0]
    assert b"Received: from client.test (unknown [127.0.0.1])" in head
    assert b"by gw.test (filterd) with ESMTP id" in head
    assert b"for <b@example.org>" in head


def test_smtplib_client_with_8bitmime_and_smtputf8(gw, sink):
    token = uuid.uuid4().hex
    body = f"Subject: {token}\r\nFrom: a@example.com\r\n\r\nGrüße aus Köln\r\n".encode()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=20) as c:
        c.ehlo("client.test")
        assert c.has_extn("smtputf8") and c.has_extn("8bitmime")
        refused = c.sendmail("jörg@example.com", ["zoë@example.org"], body,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    (m,) = wait_for(lambda: at_sink(sink, token), what="utf8 message")
    assert "Grüße aus Köln".encode() in m


def test_swaks_sends_a_message(gw, sink):
    token = uuid.uuid4().hex
    p = subprocess.run(["swaks", "--server", f"127.0.0.1:{gw.port}", "--from", "a@example.com",
                        "--to", "b@example.org", "--header", f"Subject: {token}",
                        "--pipeline"], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout.decode()
    wait_for(lambda: at_sink(sink, token), what="swaks message")


# ------------------------------------------------------------------------------- bad input -----
def test_commands_out_of_order_get_503(gw):
    r = Raw(gw.port)
    r.reply()
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 503  # before EHLO
    assert r.cmd("EHLO client.test")[0] == 250
    assert r.cmd("RCPT TO:<b@example.org>")[0] == 503  # before MAIL
    assert r.cmd("DATA")[0] == 503
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 503  # nested
    assert r.cmd("DATA")[0] == 554  # no recipients
    assert r.cmd("BDAT 10 LAST")[0] == 502
    assert r.cmd("FOO")[0] == 502
    assert r.cmd("RSET")[0] == 250
    assert r.cmd("QUIT")[0] == 221
    r.close()


def test_long_command_line_is_refused_and_the_session_goes_on(gw):
    r = start_session(gw.port)
    code, text = r.cmd("MAIL FROM:<" + "a" * 5000 + "@example.com>")
    assert code == 500 and "too long" in text
    assert r.cmd("NOOP")[0] == 250
    r.close()


def test_bare_cr_and_nul_in_commands_are_refused(gw):
    r = start_session(gw.port)
    assert r.cmd("NOOP\rMAIL FROM:<a@example.com>")[0] == 500
    r.send(b"NOOP\x00\r\n")
    assert r.reply()[0] == 500
    assert r.cmd("NOOP")[0] == 250
    r.close()


def test_line_over_998_octets_in_data_is_refused(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["b@example.org"], message(token, body="x" * 1200 + "\r\n"))
    assert code == 550 and "5.6.0" in text and "998" in text
    time.sleep(0.5)
    assert at_sink(sink, token) == []


def test_nul_byte_in_data_is_refused(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["b@example.org"], message(token, body="a\x00b\r\n"))
    assert code == 550 and "NUL" in text
    time.sleep(0.5)
    assert at_sink(sink, token) == []


def test_declared_size_over_the_limit_is_refused_at_mail(gw):
    r = start_session(gw.port)
    code, text = r.cmd("MAIL FROM:<a@example.com> SIZE=999999999")
    assert code == 552 and "5.3.4" in text
    r.close()


def test_oversized_message_gets_552_after_the_data_and_nothing_is_stored(gw, sink):
    token = uuid.uuid4().hex
    big = message(token, body=("y" * 900 + "\r\n") * 400)  # ~360 KB > 200K
    code, text = send(gw.port, ["b@example.org"], big)
    assert code == 552 and "5.3.4" in text
    # the session is still usable after the refusal
    token2 = uuid.uuid4().hex
    assert send(gw.port, ["b@example.org"], message(token2))[0] == 250
    wait_for(lambda: at_sink(sink, token2), what="message after the oversized one")
    assert at_sink(sink, token) == []


def test_unknown_esmtp_parameters_are_refused(gw):
    r = start_session(gw.port)
    assert r.cmd("MAIL FROM:<a@example.com> FROB=1")[0] == 555
    assert r.cmd("MAIL FROM:<a@example.com> BODY=BINARYMIME")[0] == 555
    assert r.cmd("MAIL FROM:<a@example.com> BODY=8BITMIME RET=HDRS ENVID=x1")[0] == 250
    assert r.cmd("RCPT TO:<b@example.org> NOTIFY=BOGUS")[0] == 501
    assert r.cmd("RCPT TO:<b@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.org")[0] \
        == 250
    r.close()


def test_client_disconnecting_mid_data_leaves_nothing_behind(gw, sink):
    token = uuid.uuid4().hex
    before = len(gw.spool_files())
    r = start_session(gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    r.cmd("RCPT TO:<b@example.org>")
    assert r.cmd("DATA")[0] == 354
    r.send(message(token, body="part of a message\r\n" * 100))
    r.close()
    time.sleep(1.0)
    assert at_sink(sink, token) == []
    assert len(gw.spool_files()) <= before
    assert not list((gw.state / "spool" / "tmp").iterdir())
    assert "client gone (eof) during a transaction" in gw.log()


def test_slow_client_is_served(gw, sink):
    token = uuid.uuid4().hex
    r = start_session(gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    r.cmd("RCPT TO:<b@example.org>")
    assert r.cmd("DATA")[0] == 354
    data = message(token).encode() + b"\r\n.\r\n"
    for i in range(0, len(data), 7):  # tiny chunks, with pauses, CRLF.CRLF split across writes
        r.send(data[i:i + 7])
        time.sleep(0.01)
    assert r.reply()[0] == 250
    r.close()
    wait_for(lambda: at_sink(sink, token), what="slow client's message")


def test_idle_client_times_out_with_421(closed_gw):
    r = Raw(closed_gw.port)
    r.reply()
    code, text = r.reply()  # nothing sent: command_timeout = 2s
    assert code == 421 and "4.4.2" in text
    assert r.closed()


def test_stalled_data_times_out_with_421_and_nothing_is_stored(closed_gw):
    token = uuid.uuid4().hex
    r = start_session(closed_gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    assert r.cmd("RCPT TO:<bob@local.test>")[0] == 250
    assert r.cmd("DATA")[0] == 354
    r.send(message(token))  # and then nothing: data_timeout = 2s
    code, text = r.reply()
    assert code == 421 and "4.4.2" in text
    assert r.closed()
    md = closed_gw.state / "mail" / "local.test" / "bob" / "Maildir" / "new"
    time.sleep(0.5)
    assert not (md.is_dir() and any(token.encode() in f.read_bytes() for f in md.iterdir()))
    assert not closed_gw.spool_files()


def test_per_ip_connection_limit(closed_gw):
    conns = [Raw(closed_gw.port) for _ in range(3)]
    for c in conns:
        assert c.reply()[0] == 220
    extra = Raw(closed_gw.port)
    code, text = extra.reply()
    assert code == 421 and "Too many connections" in text
    for c in conns + [extra]:
        c.close()


def test_pipelining_before_ehlo_is_refused(gw):
    r = Raw(gw.port)
    r.reply()
    r.send("HELO client.test\r\nMAIL FROM:<a@example.com>\r\n")
    code, text = r.reply()
    assert code == 503 and "pipelining" in text
    r.close()


def test_pipelined_transaction_after_ehlo(gw, sink):
    token = uuid.uuid4().hex
    r = start_session(gw.port)
    r.send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
           "DATA\r\n")
    assert [r.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    r.send(message(token) + "\r\n.\r\nQUIT\r\n")
    assert r.reply()[0] == 250
    assert r.reply()[0] == 221
    r.close()
    wait_for(lambda: at_sink(sink, token), what="pipelined message")


def test_max_recipients_gives_452(gw):
    r = start_session(gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    for i in range(5):
        assert r.cmd(f"RCPT TO:<u{i}@example.org>")[0] == 250
    code, text = r.cmd("RCPT TO:<u6@example.org>")
    assert code == 452 and "4.5.3" in text
    r.close()


def test_too_many_received_headers_is_a_loop(gw, sink):
    token = uuid.uuid4().hex
    hops = "".join(f"Received: from h{i}.example by h{i+1}.example; "
                   f"Fri, 27 Nov 2026 08:00:00 +0000\r\n" for i in range(51))
    code, text = send(gw.port, ["b@example.org"], hops + message(token))
    assert code == 554 and "5.4.6" in text
    ok = "".join(f"Received: from h{i}.example by x; Fri, 27 Nov 2026 08:00:00 +0000\r\n"
                 for i in range(10))
    assert send(gw.port, ["b@example.org"], ok + message(token + "ok"))[0] == 250


# ------------------------------------------------------------------------------- relay ---------
TRICKS = [
    "user%other.example@local.test",
    "other.example!user@local.test",
    '"user@other.example"@local.test',
    "@local.test:user@other.example",
    "@a.example,@local.test:user@other.example",
    "user@other.example@local.test",
    '"user%other.example"@local.test',
    "user@[192.0.2.1]",
    "user@local.test.",
    "user@-bad-.test",
]


@pytest.mark.parametrize("address", TRICKS)
def test_address_tricks_are_refused_even_from_mynetworks(gw, address):
    r = start_session(gw.port)
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    code, text = r.cmd(f"RCPT TO:<{address}>")
    assert code in (550, 501, 553), text
    assert code != 250
    r.close()


@pytest.mark.parametrize("address", TRICKS)
def test_address_tricks_are_refused_from_outside(closed_gw, address):
    r = start_session(closed_gw.port)
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    code, text = r.cmd(f"RCPT TO:<{address}>")
    assert code >= 500, text
    r.close()


def test_relay_is_denied_outside_mynetworks(closed_gw):
    r = start_session(closed_gw.port)
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    code, text = r.cmd("RCPT TO:<someone@example.org>")
    assert code == 554 and "Relay access denied" in text and "5.7.1" in text
    assert r.cmd("RCPT TO:<bob@local.test>")[0] == 250  # own domain: accepted
    assert r.cmd("RCPT TO:<Postmaster>")[0] == 250  # RFC 5321 4.5.1
    r.close()


def test_unknown_recipient_of_a_relay_domain_is_refused(gw):
    r = start_session(gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    code, text = r.cmd("RCPT TO:<nobody@relay.test>")
    assert code == 550 and "5.1.1" in text
    assert r.cmd("RCPT TO:<known@relay.test>")[0] == 250
    assert r.cmd("RCPT TO:<anyone@local.test>")[0] == 250  # "@local.test" in the list
    r.close()


def test_local_domain_is_delivered_into_a_maildir(gw):
    token = uuid.uuid4().hex
    assert send(gw.port, ["alice@local.test"], message(token))[0] == 250
    md = gw.state / "mail" / "local.test" / "alice" / "Maildir" / "new"
    files = wait_for(lambda: list(md.iterdir()) if md.is_dir() else [], what="maildir file")
    assert token.encode() in files[0].read_bytes()


# ------------------------------------------------------------------ per-recipient outcomes -----
def test_mixed_accept_and_reject_delivers_to_the_accepted_only(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["ok1@example.org", "reject1@example.org"], message(token))
    assert code == 250
    (m,) = wait_for(lambda: at_sink(sink, token), what="accepted copy")
    time.sleep(0.5)
    assert len(at_sink(sink, token)) == 1
    assert "rejected recipient of an accepted message dropped without DSN" in gw.log()


def test_all_rejected_gives_the_reject_reply(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["reject1@example.org", "reject2@example.org"], message(token))
    assert code == 550 and "Rejected for this recipient" in text
    time.sleep(0.5)
    assert at_sink(sink, token) == []


def test_any_tempfail_tempfails_the_whole_message(gw, sink):
    token = uuid.uuid4().hex
    code, text = send(gw.port, ["ok@example.org", "tempfail@example.org"], message(token))
    assert code == 451 and "Not now" in text
    time.sleep(0.5)
    assert at_sink(sink, token) == []


def test_quarantined_recipient_is_held_in_the_spool(gw, sink):
    token = uuid.uuid4().hex
    held_before = len(gw.spool_files("hold"))
    code, _ = send(gw.port, ["ok2@example.org", "quar@example.org", "discard@example.org"],
                   message(token))
    assert code == 250
    (m,) = wait_for(lambda: at_sink(sink, token), what="delivered copy")
    held = wait_for(lambda: len(gw.spool_files("hold")) > held_before, what="held copy")
    assert held
    time.sleep(0.3)
    assert len(at_sink(sink, token)) == 1


# ------------------------------------------------------------------------------- signals -------
def test_sighup_reloads_without_dropping_a_session(tmp_path, sink):
    cfg = '[smtp]\nmax_message_size = "100K"\n'
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}", config_text=cfg)
    try:
        r = start_session(g.port)  # a session open across the reload
        assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
        (g.state / "filterd.toml").write_text('[smtp]\nmax_message_size = "300K"\n')
        g.signal(signal.SIGHUP)
        wait_for(lambda: "reload done" in g.log(), what="reload")
        token = uuid.uuid4().hex
        assert r.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert r.cmd("DATA")[0] == 354
        r.send(message(token) + "\r\n.\r\n")
        assert r.reply()[0] == 250
        r.close()
        r2 = Raw(g.port)
        r2.reply()
        assert "SIZE 307200" in r2.cmd("EHLO x.test")[1]
        r2.close()
        wait_for(lambda: at_sink(sink, token), what="message sent across reload")
        # a broken config on reload keeps the running one
        (g.state / "filterd.toml").write_text('[smtp]\nmax_message_size = "lots"\n')
        g.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in g.log(), what="failed reload logged")
        r3 = Raw(g.port)
        r3.reply()
        assert "SIZE 307200" in r3.cmd("EHLO x.test")[1]
        r3.close()
    finally:
        g.stop()


def test_sigterm_lets_a_running_session_finish(tmp_path, sink):
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}")
    token = uuid.uuid4().hex
    r = start_session(g.port)
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    g.signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new sessions
        c = socket.create_connection(("127.0.0.1", g.port), timeout=2)
        if not c.recv(100).startswith(b"220"):
            raise OSError("refused")
        c.close()
    assert r.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert r.cmd("DATA")[0] == 354
    r.send(message(token) + "\r\n.\r\n")
    assert r.reply()[0] == 250
    assert r.cmd("QUIT")[0] == 221
    r.close()
    assert g.proc.wait(30) == 0
    assert "stopped" in g.log()


def test_worker_processes_share_the_listener_and_deliver(tmp_path, sink):
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}", "--workers", "2")
    try:
        children = subprocess.run(["pgrep", "-P", str(g.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2
        tokens = [uuid.uuid4().hex for _ in range(12)]
        for t in tokens:
            assert send(g.port, ["b@example.org"], message(t))[0] == 250
        for t in tokens:
            wait_for(lambda t=t: at_sink(sink, t), what=f"message {t}")
        # a worker that dies is replaced
        import os
        os.kill(int(children[0]), signal.SIGKILL)
        wait_for(lambda: "restarting" in g.log(), what="worker restart")
        token = uuid.uuid4().hex
        for _ in range(4):  # the kernel spreads connections over both workers
            assert send(g.port, ["b@example.org"], message(token))[0] == 250
    finally:
        assert g.stop() == 0
    left = subprocess.run(["pgrep", "-P", str(g.proc.pid)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_workers_make_first_attempts_and_the_main_process_retries(tmp_path):
    from gateway_fixtures import Sink, free_port

    port = free_port()  # nothing listens there yet: the first attempt fails
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{port}", "--workers", "2",
                "--set", "delivery.retry_initial=1s", "--set", "delivery.retry_max=1s")
    sink = None
    try:
        token = uuid.uuid4().hex
        assert send(g.port, ["b@example.org"], message(token))[0] == 250
        active = g.state / "spool" / "active"
        # the accepting worker tried, failed and recorded the next attempt for the main process
        wait_for(lambda: list(active.glob("*.state")), what="the deferred message's state")
        sink = Sink(port=port)
        wait_for(lambda: at_sink(sink, token), what="the retried message at the sink")
        assert len(at_sink(sink, token)) == 1
    finally:
        assert g.stop() == 0
        if sink is not None:
            sink.stop()


def test_empty_message_ends_at_the_first_dot_line(gw):
    r = start_session(gw.port)
    r.cmd("MAIL FROM:<a@example.com>")
    r.cmd("RCPT TO:<b@example.org>")
    assert r.cmd("DATA")[0] == 354
    time.sleep(0.2)  # the dot arrives on its own, after the 354
    code, text = r.cmd(".")
    assert code == 250, text
    r.close()


def test_global_session_limit(tmp_path, sink):
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}", "--set", "smtp.max_sessions=2")
    try:
        conns = [Raw(g.port) for _ in range(2)]
        for c in conns:
            assert c.reply()[0] == 220
        extra = Raw(g.port)
        code, text = extra.reply()
        assert code == 421 and "4.7.0" in text
        extra.close()
        conns[0].cmd("QUIT")
        conns[0].close()
        time.sleep(0.3)
        again = Raw(g.port)  # a slot is free again
        assert again.reply()[0] == 220
        again.close()
        conns[1].close()
    finally:
        g.stop()


def test_connect_time_reject_allows_only_quit(tmp_path, sink):
    site = tmp_path / "site"
    site.mkdir()
    (site / "no_clients.py").write_text(
        "from filterd.hookspecs import hookimpl\n"
        "from filterd.verdict import Verdict\n"
        "@hookimpl\n"
        "def connect(ctx):\n"
        "    return Verdict.reject('Your network is blocked')\n")
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}",
                "--set", f"plugins.site_dir={site}")
    try:
        r = Raw(g.port)
        code, text = r.reply()
        assert code == 554 and "Your network is blocked" in text
        assert r.cmd("EHLO x.test")[0] == 503
        assert r.cmd("MAIL FROM:<a@example.com>")[0] == 503
        assert r.cmd("QUIT")[0] == 221
        r.close()
    finally:
        g.stop()


def test_spool_flag_puts_the_queue_where_asked(tmp_path):
    from gateway_fixtures import free_port
    spool = tmp_path / "myspool"
    dead = free_port()  # nothing listens: the message must wait in the given spool
    g = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{dead}", "--spool", str(spool))
    try:
        token = uuid.uuid4().hex
        assert send(g.port, ["b@example.org"], message(token))[0] == 250
        files = [p for p in (spool / "active").iterdir() if not p.name.endswith(".state")]
        assert len(files) == 1 and token.encode() in files[0].read_bytes()
    finally:
        g.stop()
