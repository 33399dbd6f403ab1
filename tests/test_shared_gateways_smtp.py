"""Two real `filterd serve` gateways sharing one Redis, driven over SMTP, relaying to a real
smtp-sink: a greylisted triplet retried at the other gateway passes, and a rate limit counts
across both. (Clients come from loopback, which the shipped defaults exempt; the exemptions are
emptied here.)"""
from __future__ import annotations

import time
import uuid

import pytest
from gateway_fixtures import Gateway, Sink, start_session
from redis_helpers import SHARED_REDIS

pytest_plugins = ["store_fixtures"]  # redis_prefix


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def gateways(tmp_path, sink, redis_prefix):
    made = []

    def make(*extra: str):
        shared = ["--relayhost", f"127.0.0.1:{sink.port}",
                  "--set", "store.backend=redis", "--set", f"store.url={SHARED_REDIS}",
                  "--set", f"store.prefix={redis_prefix}",
                  "--set", "greylist.skip_networks=[]", "--set", "ratelimit.exempt_networks=[]"]
        g = [Gateway(tmp_path / name, *shared, *extra) for name in ("A", "B")]
        made.extend(g)
        return g

    yield make
    for g in made:
        g.stop()


def transaction(port: int, sender: str, rcpt: str, token: str) -> list[tuple[int, str]]:
    """MAIL, RCPT and (if both were accepted) DATA; the replies in order."""
    r = start_session(port)
    out = [r.cmd(f"MAIL FROM:<{sender}>")]
    if out[-1][0] == 250:
        out.append(r.cmd(f"RCPT TO:<{rcpt}>"))
        if out[-1][0] == 250:
            assert r.cmd("DATA")[0] == 354
            r.send(f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {token}\r\n"
                   f"Message-ID: <{token}@example.com>\r\n\r\nHello {token}\r\n.\r\n")
            out.append(r.reply())
    r.cmd("QUIT")
    r.close()
    return out


def test_greylisted_at_gateway_a_passes_when_retried_at_gateway_b(gateways, sink):
    a, b = gateways("--set", "greylist.enabled=true", "--set", "greylist.delay=1s")
    token = uuid.uuid4().hex
    first = transaction(a.port, "alice@sender.test", "bob@remote.test", token)
    assert first[0][0] == 250
    code, text = first[1]
    assert code == 451 and "4.7.1" in text and "Greylisted" in text
    time.sleep(1.2)
    retry = transaction(b.port, "alice@sender.test", "bob@remote.test", token)
    assert [c for c, _ in retry] == [250, 250, 250], retry
    msgs = sink.wait_count(1)
    assert any(token.encode() in m for m in msgs)


def test_rate_limit_counts_across_both_gateways(gateways, sink):
    a, b = gateways("--set", "ratelimit.ip.limit=3", "--set", "ratelimit.ip.window=1h")
    replies = []
    for i in range(5):
        gw = a if i % 2 == 0 else b
        replies.append(transaction(gw.port, f"s{i}@sender.test", "bob@remote.test",
                                   f"rl{i}-{uuid.uuid4().hex}"))
    assert [r[-1][0] for r in replies[:3]] == [250, 250, 250]
    for r in replies[3:]:  # refused at MAIL FROM, at either gateway
        code, text = r[0]
        assert code == 451 and "more than 3 per 1h" in text, r
    assert len(sink.wait_count(3)) == 3


def test_gateway_keeps_accepting_mail_while_redis_is_stopped_and_started(tmp_path, sink,
                                                                        own_redis):
    srv = own_redis()
    gw = Gateway(tmp_path / "gw", "--relayhost", f"127.0.0.1:{sink.port}",
                 "--set", "store.backend=redis", "--set", f"store.url={srv.url}",
                 "--set", "store.prefix=gwdown:", "--set", "store.timeout=300ms",
                 "--set", "store.redis_down.retry=1s",
                 "--set", "ratelimit.exempt_networks=[]", "--set", "ratelimit.ip.limit=100")
    try:
        assert transaction(gw.port, "a@s.test", "bob@remote.test", "up1")[-1][0] == 250
        srv.stop()
        for i in range(3):  # Redis down: mail still flows (this node's embedded store)
            assert transaction(gw.port, "a@s.test", "bob@remote.test", f"down{i}")[-1][0] == 250
        srv.start()
        time.sleep(1.2)
        assert transaction(gw.port, "a@s.test", "bob@remote.test", "up2")[-1][0] == 250
        import redis

        r = redis.Redis(port=srv.port)
        assert r.exists("gwdown:rl:ip:127.0.0.1")  # counting in Redis again
        r.close()
        assert len(sink.wait_count(5)) == 5
        log = gw.log()
        assert "is down" in log and "answers again" in log
    finally:
        gw.stop()
