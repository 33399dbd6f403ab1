"""Proxy mode against a real smtp-sink as the next hop (Postfix's re-injection port stand-in):
replies come from the next hop, per-recipient outcomes reach it by replaying the transaction,
and a missing next hop is a clean temporary failure."""
from __future__ import annotations

import uuid

import pytest

from gateway_fixtures import Gateway, Sink, free_port, message, start_session, wait_for
from test_smtp_listener import SITE_PLUGIN, at_sink, send


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, sink):
    base = tmp_path_factory.mktemp("proxy")
    site = base / "site"
    site.mkdir()
    (site / "outcome_by_name.py").write_text(SITE_PLUGIN)
    g = Gateway(base, "--mode", "proxy", "--next-hop", f"127.0.0.1:{sink.port}",
                "--set", f"plugins.site_dir={site}")
    yield g
    g.stop()


def test_the_next_hops_reply_is_relayed(proxy, sink):
    token = uuid.uuid4().hex
    code, text = send(proxy.port, ["b@example.org"], message(token))
    assert code == 250
    # the reply text is the next hop's, as logged when it answered
    said = text.strip()[4:]
    assert f"next hop answered 250 {said}" in proxy.log()
    (m,) = wait_for(lambda: at_sink(sink, token), what="forwarded message")
    assert b"(filterd)" not in m  # the proxy adds no Received: of its own (Postfix does)


def test_mixed_outcome_is_replayed_with_the_delivering_recipients_only(proxy, sink):
    token = uuid.uuid4().hex
    code, _ = send(proxy.port, ["ok@example.org", "reject-me@example.org", "ok2@example.org"],
                   message(token))
    assert code == 250
    (m,) = wait_for(lambda: at_sink(sink, token), what="forwarded message")
    assert b"ok@example.org" in m and b"ok2@example.org" in m
    assert b"reject-me@example.org" not in m


def test_reject_is_answered_in_session_and_nothing_forwarded(proxy, sink):
    token = uuid.uuid4().hex
    code, text = send(proxy.port, ["reject-a@example.org"], message(token))
    assert code == 550 and "Rejected for this recipient" in text
    import time
    time.sleep(0.5)
    assert at_sink(sink, token) == []


def test_next_hop_down_is_a_temporary_failure(tmp_path):
    g = Gateway(tmp_path, "--mode", "proxy", "--next-hop", f"127.0.0.1:{free_port()}")
    try:
        r = start_session(g.port)
        code, text = r.cmd("MAIL FROM:<a@example.com>")
        assert code == 451 and "4.4.1" in text
        r.close()
        assert "cannot connect to next hop" in g.log()
    finally:
        g.stop()
