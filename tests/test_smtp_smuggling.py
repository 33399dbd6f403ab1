"""SMTP smuggling: every fake end-of-data sequence from SEC Consult's scanner and Hanno Böck's
smtpsmug (tests/data/smtp-smuggling/eod_sequences.json) sent to a real `filterd serve` gateway
relaying to a real smtp-sink. Only CRLF.CRLF may end DATA: the smuggled MAIL/RCPT/DATA must never
become a second message. With the default policy (bare CR/LF and NUL rejected) the message is
refused with 550 5.6.0 and nothing comes out; with `bare_newlines = "normalize"` and
`nul_bytes = "strip"` exactly one message comes out, with the smuggled commands in its body."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from gateway_fixtures import Gateway, Sink, start_session

DATA = Path(__file__).parent / "data" / "smtp-smuggling" / "eod_sequences.json"


def _sequences() -> list[tuple[str, str]]:
    d = json.loads(DATA.read_text())
    seqs: dict[str, str] = {}
    for i, s in enumerate(d["sec_consult_inbound_eod_sequences"]):
        seqs.setdefault(s, f"secconsult-in-{i}")
    for i, s in enumerate(d["sec_consult_outbound_eod_sequences"]):
        seqs.setdefault(s, f"secconsult-out-{i}")
    for name, s in d["hannob_smtpsmug_tests"].items():
        seqs.setdefault(s, f"smtpsmug-{name}")
    return [(name, s) for s, name in seqs.items()]


SEQUENCES = _sequences()


def test_every_sequence_of_the_data_file_is_covered():
    d = json.loads(DATA.read_text())
    allseq = (set(d["sec_consult_inbound_eod_sequences"]) |
              set(d["sec_consult_outbound_eod_sequences"]) |
              set(d["hannob_smtpsmug_tests"].values()))
    assert {s for _, s in SEQUENCES} == allseq
    assert len(SEQUENCES) >= 12


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    s = Sink(tmp_path_factory.mktemp("smug"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_gw(tmp_path_factory, sink):
    g = Gateway(tmp_path_factory.mktemp("gw-strict"), "--relayhost", f"127.0.0.1:{sink.port}")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def lenient_gw(tmp_path_factory, sink):
    g = Gateway(tmp_path_factory.mktemp("gw-lenient"), "--relayhost", f"127.0.0.1:{sink.port}",
                "--set", "smtp.bare_newlines=normalize", "--set", "smtp.nul_bytes=strip")
    yield g
    g.stop()


def _smuggle_payload(token: str, seq: str) -> bytes:
    head = (f"From: a@example.com\r\nTo: b@example.org\r\nSubject: {token}\r\n\r\n"
            f"first message body {token}").encode()
    smuggled = (f"MAIL FROM:<evil@example.net>\r\nRCPT TO:<victim-{token}@example.org>\r\n"
                f"DATA\r\nFrom: ceo@example.com\r\nSubject: smuggled-{token}\r\n\r\n"
                f"SMUGGLED-{token}\r\n").encode()
    return head + seq.encode("latin-1") + smuggled + b"\r\n.\r\n"


def _messages_with(sink, token: str) -> list[bytes]:
    return [m for m in sink.messages() if token.encode() in m]


def _run(gw, token: str, seq: str, pipelined: bool) -> list[int]:
    """Send one transaction; return every reply code after the RCPT (DATA, end of data, QUIT)."""
    r = start_session(gw.port)
    payload = _smuggle_payload(token, seq)
    codes = []
    if pipelined:
        # the whole transaction in one write, as a PIPELINING client (and an attacker) would,
        # but DATA content only after 354 (anything else is refused as improper pipelining)
        r.send(f"MAIL FROM:<a@example.com>\r\nRCPT TO:<b-{token}@example.org>\r\nDATA\r\n")
        assert r.reply()[0] == 250
        assert r.reply()[0] == 250
        c, _ = r.reply()
        codes.append(c)
        r.send(payload + b"QUIT\r\n")
        codes.append(r.reply()[0])
        codes.append(r.reply()[0])
    else:
        assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
        assert r.cmd(f"RCPT TO:<b-{token}@example.org>")[0] == 250
        codes.append(r.cmd("DATA")[0])
        r.send(payload)
        codes.append(r.reply()[0])
        codes.append(r.cmd("QUIT")[0])
    assert r.closed()
    r.close()
    return codes


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("name,seq", SEQUENCES, ids=[n for n, _ in SEQUENCES])
def test_fake_end_of_data_is_refused_by_default(strict_gw, sink, name, seq, pipelined):
    token = uuid.uuid4().hex[:12]
    codes = _run(strict_gw, token, seq, pipelined)
    # 354, then ONE final reply for the message (550: bare CR/LF or NUL), then QUIT's 221:
    # no reply was ever produced for the smuggled MAIL/RCPT/DATA
    assert codes == [354, 550, 221], codes
    # also a normal message right after, so "nothing came out" is not just a dead pipeline
    ok_token = uuid.uuid4().hex[:12]
    r = start_session(strict_gw.port)
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    assert r.cmd(f"RCPT TO:<ok-{ok_token}@example.org>")[0] == 250
    assert r.cmd("DATA")[0] == 354
    r.send(f"Subject: {ok_token}\r\n\r\nfine\r\n.\r\n")
    assert r.reply()[0] == 250
    r.cmd("QUIT")
    r.close()
    sink.wait_count(1)  # at least something arrives at all
    from gateway_fixtures import wait_for
    wait_for(lambda: _messages_with(sink, ok_token), 20, "the control message")
    assert _messages_with(sink, token) == []
    assert not [m for m in sink.messages() if f"victim-{token}".encode() in m]


@pytest.mark.parametrize("pipelined", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("name,seq", SEQUENCES, ids=[n for n, _ in SEQUENCES])
def test_fake_end_of_data_stays_in_the_body_when_normalizing(lenient_gw, sink, name, seq,
                                                             pipelined):
    token = uuid.uuid4().hex[:12]
    codes = _run(lenient_gw, token, seq, pipelined)
    assert codes == [354, 250, 221], codes
    from gateway_fixtures import wait_for
    msgs = wait_for(lambda: _messages_with(sink, token), 20, "the message at the sink")
    import time
    time.sleep(0.3)
    msgs = _messages_with(sink, token)
    assert len(msgs) == 1, f"{len(msgs)} messages came out"
    m = msgs[0]
    # the smuggled commands are body text of the one message, addressed to the real recipient
    assert f"SMUGGLED-{token}".encode() in m
    assert "MAIL FROM:<evil@example.net>".encode() in m
    assert f"b-{token}@example.org".encode() in m


@pytest.mark.parametrize("greeting", ["EHLO", "HELO"])
def test_second_message_pipelined_behind_the_data_is_not_accepted_blindly(strict_gw, sink,
                                                                          greeting):
    """smtpsmug's pipelining test: after a correct CRLF.CRLF the client sends MAIL/RCPT/DATA and
    a second message without waiting for any reply. A second message is only taken after its
    354; content sent ahead of the 354 is refused as improper pipelining (and with HELO no
    pipelining is allowed at all)."""
    from gateway_fixtures import Raw, wait_for
    t1, t2 = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    r = Raw(strict_gw.port)
    assert r.reply()[0] == 220
    assert r.cmd(f"{greeting} client.test")[0] == 250
    assert r.cmd("MAIL FROM:<a@example.com>")[0] == 250
    assert r.cmd(f"RCPT TO:<one-{t1}@example.org>")[0] == 250
    assert r.cmd("DATA")[0] == 354
    r.send(f"Subject: {t1}\r\n\r\nfirst\r\n.\r\n"
           f"MAIL FROM:<evil@example.net>\r\nRCPT TO:<two-{t2}@example.org>\r\nDATA\r\n"
           f"Subject: {t2}\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
    codes = []
    r.sock.settimeout(3)  # the QUIT went down with the refused pipeline: stop reading after 3s
    try:
        while True:
            codes.append(r.reply()[0])
    except (ConnectionError, OSError):
        pass
    r.close()
    assert codes[0] == 250  # the first, real message
    assert 354 not in codes  # the second one's content never counted as a message
    assert 503 in codes
    wait_for(lambda: [m for m in sink.messages() if t1.encode() in m], 20, "first message")
    import time
    time.sleep(0.5)
    assert not [m for m in sink.messages() if f"two-{t2}".encode() in m]
