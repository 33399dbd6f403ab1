"""Milter mode end to end: a private Postfix with smtpd_milters pointing at `filterd milter`,
relaying to smtp-sink (which writes every message it receives to a file). Each test sends with a
real SMTP client and checks what the client saw and what arrived at the sink (or stayed in
Postfix's hold queue)."""
from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from conftest import GTUBE, make_message
from milter_support import FilterdMilterProc, Postfix, Sink, have_postfix

pytestmark = [pytest.mark.skipif(not have_postfix(), reason="postfix/smtp-sink not installed"),
              pytest.mark.usefixtures("milter_engine")]

DATA = Path(__file__).parent / "data" / "milter"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, milter_engine):
    tmp = tmp_path_factory.mktemp("milter-e2e")
    cfg = tmp / "filterd.toml"
    cfg.write_text(f"""
[server]
state_dir = "{tmp / 'state'}"
[rules]
site_dir = "{DATA / 'rules'}"
[plugins]
site_dir = "{DATA / 'plugins'}"
[spam_headers]
add = "always"
[milter]
quarantine = "hold"
""")
    # thresholds (incl. per recipient) come from tests/data/milter/rules/milter-test-actions.toml
    (tmp / "state").mkdir()
    sink = Sink()
    milter = FilterdMilterProc(config=str(cfg), state_dir=str(tmp / "state"))
    pf = Postfix(sink.port, milter=milter.spec)
    yield sink, milter, pf
    pf.stop()
    milter.stop()
    sink.stop()


def send(pf, rcpts, msg: bytes, sender="alice@example.com"):
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
        return s.sendmail(sender, rcpts, msg)


def arrived(sink, marker: bytes, timeout: float = 20.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in sink.messages() if marker in m]
        if found:
            time.sleep(0.2)
            return [m for m in sink.messages() if marker in m]
        time.sleep(0.1)
    return []


def header_block(msg: bytes) -> bytes:
    return msg.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in msg else msg.split(b"\n\n", 1)[0]


def test_gtube_is_rejected_with_filterds_reply_visible_to_the_smtp_client(stack):
    sink, milter, pf = stack
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(pf, ["bob@example.org"], make_message(body=f"spam\r\n{GTUBE}\r\n",
                                                   subject="gtube-e2e"))
    assert err.value.smtp_code == 550
    assert b"5.7.1 Message rejected as spam (score 1000.0)" in err.value.smtp_error
    assert not arrived(sink, b"gtube-e2e", timeout=2)
    assert milter.alive()


def test_clean_message_arrives_with_added_headers_and_original_bytes(stack):
    sink, milter, pf = stack
    body = "Hello Bob,\r\n\r\nclean-e2e body line.\r\n"
    msg = make_message(body=body, subject="clean-e2e",
                       extra_headers="X-Folded: first part\r\n\tsecond part\r\n")
    assert send(pf, ["bob@example.org"], msg) == {}
    got = arrived(sink, b"clean-e2e")
    assert len(got) == 1
    head = header_block(got[0])
    assert b"X-Spam-Status: No, score=0.0" in head
    assert b"X-Spam-Flag: NO" in head
    # the headers Postfix passed are kept as received (folding included), the body too
    assert b"X-Folded: first part\r\n\tsecond part" in got[0].replace(b"\n", b"\r\n").replace(
        b"\r\r\n", b"\r\n")
    assert b"\n\n" + body.replace("\r\n", "\n").encode() in got[0].replace(b"\r\n", b"\n")
    # added headers sit above the message's own headers
    assert head.index(b"X-Spam-Status:") < head.index(b"From: Alice")


def test_recipients_with_different_outcomes_split(stack):
    sink, milter, pf = stack
    msg = make_message(body="milter-split-marker here\r\n", subject="split-e2e")
    # ok@ accepts (score 5 < 6), strict@ rejects (>= 3), bin@ discards (>= 3)
    refused = send(pf, ["ok@example.org", "strict@example.org", "bin@example.org"], msg)
    assert refused == {}
    got = arrived(sink, b"split-e2e")
    assert len(got) == 1, got
    env = header_block(got[0])
    assert b"X-Rcpt-Args: <ok@example.org>" in env
    assert b"strict@example.org" not in env.replace(b"To: bob", b"")
    assert b"<bin@example.org>" not in env
    assert b"MILTER_TEST_SPLIT" in env  # the report names the symbol


def test_quarantined_message_is_held_in_postfix_hold_queue(stack):
    sink, milter, pf = stack
    before = len(pf.held())
    msg = make_message(body="milter-hold-marker\r\n", subject="hold-e2e")
    assert send(pf, ["bob@example.org"], msg) == {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(pf.held()) <= before:
        time.sleep(0.1)
    assert len(pf.held()) == before + 1, pf.log()[-2000:]
    assert "hold-e2e" not in "".join(m.decode(errors="replace") for m in sink.messages())
    assert "milter triggers HOLD action" in pf.log()


def test_quarantine_store_mode_keeps_the_message_in_filterds_quarantine(tmp_path):
    """quarantine = "auto" picks filterd's quarantine service (registered by the quarantine
    plugin, enabled here): the message is stored there and discarded at the MTA, not delivered,
    not held."""
    sink = Sink()
    cfg = tmp_path / "filterd.toml"
    cfg.write_text(f'[rules]\nsite_dir = "{DATA / "rules"}"\n[quarantine]\nenabled = true\n')
    milter = FilterdMilterProc(config=str(cfg))
    pf = Postfix(sink.port, milter=milter.spec)
    try:
        msg = make_message(body="milter-hold-marker\r\n", subject="store-e2e")
        assert send(pf, ["bob@example.org"], msg) == {}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "stored=bob@example.org" not in milter.log():
            time.sleep(0.1)
        assert "stored=bob@example.org" in milter.log(), milter.log()[-3000:]
        assert "quarantined entry=" in milter.log()
        while time.monotonic() < deadline and "milter-discard" not in pf.log():
            time.sleep(0.1)  # Postfix writes its log through postlogd, a moment later
        assert "milter-discard" in pf.log()
        assert not pf.held()
        assert not arrived(sink, b"store-e2e", timeout=2)
    finally:
        pf.stop()
        milter.stop()
        sink.stop()


def test_subject_rewrite_header_change_delete_and_body_replacement(stack):
    sink, milter, pf = stack
    msg = make_message(body="milter-tag-marker milter-mods-marker\r\n", subject="mods-e2e",
                       extra_headers="X-Remove-Me: yes\r\nX-Change-Me: original\r\n")
    assert send(pf, ["bob@example.org"], msg) == {}
    got = arrived(sink, b"mods-e2e")
    assert len(got) == 1
    m = got[0]
    assert b"Subject: [SPAM] mods-e2e" in m
    assert b"X-Remove-Me" not in m
    assert b"X-Change-Me: changed by filterd" in m
    assert b"X-Spam-Flag: YES" in m
    assert b"The body was replaced by filterd." in m
    assert b"milter-mods-marker" not in m


def test_plugin_failure_tempfails_through_postfix(tmp_path):
    """A plugin that fails follows the error policy: the client gets 451, nothing is relayed."""
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    (plugdir / "broken.py").write_text(
        "from filterd.hookspecs import hookimpl\nCONFIG = ''\n"
        "@hookimpl\ndef data(ctx, message):\n    raise RuntimeError('scanner down')\n")
    sink = Sink()
    milter = FilterdMilterProc(f"plugins.site_dir={plugdir}")
    pf = Postfix(sink.port, milter=milter.spec)
    try:
        with pytest.raises(smtplib.SMTPDataError) as err:
            send(pf, ["bob@example.org"], make_message(subject="tempfail-e2e"))
        assert err.value.smtp_code == 451
        assert b"4.3.0" in err.value.smtp_error and b"broken" in err.value.smtp_error
        assert not arrived(sink, b"tempfail-e2e", timeout=2)
    finally:
        pf.stop()
        milter.stop()
        sink.stop()
