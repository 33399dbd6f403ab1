"""filterd behind a real, private Postfix (started here on high ports, see ../shared/RECIPES.md):

- after-queue ``content_filter``: Postfix → filterd gateway → Postfix re-injection smtpd →
  smtp-sink. A clean message arrives with filterd's Received: header; a GTUBE message is refused
  by filterd and Postfix (which owns the message by then) bounces it to the sender.
- before-queue ``smtpd_proxy_filter``: Postfix smtpd → filterd proxy → Postfix re-injection smtpd
  → smtp-sink. A clean message arrives; a GTUBE message is refused *in the client's session*
  with filterd's 550, and nothing reaches the sink.
"""
from __future__ import annotations

import subprocess
import uuid

import pytest

from gateway_fixtures import Gateway, Postfix, Sink, free_port, wait_for

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

REINJECT = """
127.0.0.1:{reinj} inet n - n - - smtpd
  -o content_filter=
  -o smtpd_proxy_filter=
  -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters
  -o smtpd_client_restrictions=
  -o smtpd_helo_restrictions=
  -o smtpd_sender_restrictions=
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
  -o mynetworks=127.0.0.0/8
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
"""

CONTENT_FILTER_TRANSPORT = """
filterd unix - - n - 10 smtp
  -o smtp_send_xforward_command=yes
  -o disable_mime_output_conversion=yes
"""


def swaks(port: int, token: str, body: str = "clean body", to: str = "b@example.org"):
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--from", "a@example.com", "--to", to,
         "--header", f"Subject: {token}", "--body", body],
        capture_output=True, timeout=90)


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


def test_after_queue_content_filter(tmp_path, sink):
    pf_port, reinj, fport = free_port(), free_port(), free_port()
    gw = Gateway(tmp_path, "--listen", f"127.0.0.1:{fport}",
                 "--relayhost", f"127.0.0.1:{reinj}", "--mynetworks", "127.0.0.0/8")
    pf = Postfix("cf", f"content_filter = filterd:[127.0.0.1]:{fport}\n"
                       f"relayhost = [127.0.0.1]:{sink.port}\n",
                 CONTENT_FILTER_TRANSPORT + REINJECT.format(reinj=reinj), pf_port)
    try:
        token = uuid.uuid4().hex
        p = swaks(pf_port, token)
        assert p.returncode == 0, p.stdout.decode()
        msgs = wait_for(lambda: [m for m in sink.messages() if token.encode() in m], 60,
                        "message through Postfix -> filterd -> Postfix -> sink")
        (m,) = msgs
        head = m.split(b"\r\n\r\n")[0].decode()
        assert "by gw.test (filterd)" in head
        assert head.count("Received:") >= 3  # postfix, filterd, postfix re-injection
        # spam: filterd refuses it; Postfix owns the message and bounces it to the sender
        spam = uuid.uuid4().hex
        p = swaks(pf_port, spam, body=GTUBE)
        assert p.returncode == 0
        bounce = wait_for(lambda: [x for x in sink.messages() if spam.encode() in x
                                   and b"MAILER-DAEMON" in x], 60, "Postfix's bounce")
        assert b"Message rejected as spam" in bounce[0] or b"550" in bounce[0]
        assert not [x for x in sink.messages() if spam.encode() in x and b"MAILER-DAEMON"
                    not in x]
    finally:
        pf.stop()
        gw.stop()


def test_before_queue_proxy_filter(tmp_path, sink):
    pf_port, reinj, fport = free_port(), free_port(), free_port()
    gw = Gateway(tmp_path, "--mode", "proxy", "--listen", f"127.0.0.1:{fport}",
                 "--next-hop", f"127.0.0.1:{reinj}")
    pf = Postfix("px", f"smtpd_proxy_filter = 127.0.0.1:{fport}\n"
                       f"relayhost = [127.0.0.1]:{sink.port}\n",
                 REINJECT.format(reinj=reinj), pf_port)
    try:
        token = uuid.uuid4().hex
        p = swaks(pf_port, token)
        out = p.stdout.decode()
        assert p.returncode == 0, out
        (m,) = wait_for(lambda: [x for x in sink.messages() if token.encode() in x], 60,
                        "message through the proxy")
        # the next hop's queue id came back to the client through filterd
        assert "250 2.0.0 Ok: queued as" in out
        assert "next hop answered 250" in gw.log()
        # Postfix told filterd who the real client was (XFORWARD), as filterd announced it
        assert "XFORWARD NAME=" in gw.log() and "ADDR=127.0.0.1" in gw.log()
        spam = uuid.uuid4().hex
        p = swaks(pf_port, spam, body=GTUBE)
        out = p.stdout.decode()
        assert p.returncode != 0
        assert "550" in out and "Message rejected as spam" in out, out
        import time
        time.sleep(1)
        assert not [x for x in sink.messages() if spam.encode() in x]
    finally:
        pf.stop()
        gw.stop()
