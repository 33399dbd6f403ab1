"""Delivery against real peers on loopback: Postfix's smtp-sink, a capturing aiosmtpd server,
an LMTP server; retries, DSN bounces, restart recovery, local Maildir, MX routing, TLS."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from delivery_peers import (CaptureServer, MiniLMTP, have_smtp_sink, make_cert,
                            make_core, parse, wait_for)
from gateway_fixtures import Sink
from filterd.dns import FixtureResolver
from filterd.queue import Envelope

pytestmark = pytest.mark.skipif(not have_smtp_sink(), reason="needs postfix's smtp-sink")


def msg(n: int = 0, subject: str = "hello", extra: str = "") -> bytes:
    return (f"From: Alice <alice@sender.test>\r\nTo: bob@dest.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <m{n}@sender.test>\r\n{extra}\r\nline one\r\n.line with a dot\r\n"
            f"..two dots\r\nlast line\r\n").encode()


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def capture():
    s = CaptureServer()
    yield s
    s.stop()


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


async def test_smarthost_delivers_every_message_to_smtp_sink_reusing_connections(state, sink):
    core = await make_core(state, f"delivery.relayhost=127.0.0.1:{sink.port}")
    try:
        ids = await asyncio.gather(*(core.spool.enqueue(
            Envelope("alice@sender.test", ["bob@dest.test"]), msg(i)) for i in range(60)))
        for q in ids:
            core.notify(q)
        await wait_for(lambda: sink.count() == 60 and not core.spool.ids("active"),
                       what="60 messages at smtp-sink")
        assert core.pool.opened <= 20  # connections were reused
        bodies = sink.messages()
        assert sum(b"Message-ID: <m7@sender.test>" in b for b in bodies) == 1
        assert all(b"\r\n.line with a dot\r\n..two dots\r\n" in b.replace(b"\n", b"\r\n")
                   .replace(b"\r\r\n", b"\r\n") for b in bodies)
    finally:
        await core.stop()


async def test_capturing_server_receives_exact_envelope_and_content(state, capture):
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}")
    try:
        data = msg(1)
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["bob@dest.test",
                                                                     "carol@dest.test"],
                                              mail_params={"BODY": "8BITMIME"}), data)
        core.notify(q)
        await wait_for(lambda: capture.handler.messages, what="capture")
        (m,) = capture.handler.messages
        assert m["from"] == "alice@sender.test"
        assert m["to"] == ["bob@dest.test", "carol@dest.test"]
        assert m["data"].replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")
        assert "BODY=8BITMIME" in m["mail_options"]
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
    finally:
        await core.stop()


async def test_permanent_5xx_produces_exactly_one_correct_dsn_to_the_sender(state, capture):
    """smtp-sink-like downstream refusing one recipient with 550: the sender gets one
    RFC 3464 bounce listing that recipient; the other recipient is delivered."""
    capture.handler.rcpt_replies["nobody@dest.test"] = ["550 5.1.1 <nobody@dest.test>: "
                                                        "Recipient address rejected"]
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}")
    try:
        q = await core.spool.enqueue(
            Envelope("alice@sender.test", ["bob@dest.test", "nobody@dest.test"],
                     mail_params={"ENVID": "env-42"}), msg(2, "to bounce"))
        core.notify(q)
        await wait_for(lambda: capture.handler.to("alice@sender.test"), what="bounce")
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
        await asyncio.sleep(0.5)  # nothing else should follow
        bounces = capture.handler.to("alice@sender.test")
        assert len(bounces) == 1
        b = bounces[0]
        assert b["from"] in ("", "<>")  # DSNs come from the null sender
        assert [m["to"] for m in capture.handler.messages].count(["bob@dest.test"]) == 1
        dsn = parse(b["data"])
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        assert dsn["Auto-Submitted"] == "auto-replied"
        assert dsn["To"] == "<alice@sender.test>"
        parts = dsn.get_payload()
        assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                         "message/rfc822"]
        status_blocks = parts[1].get_payload()
        per_msg, per_rcpt = status_blocks[0], status_blocks[1:]
        assert per_msg["Reporting-MTA"] == "dns; gw.test"
        assert per_msg["Original-Envelope-Id"] == "env-42"
        assert len(per_rcpt) == 1
        r = per_rcpt[0]
        assert r["Final-Recipient"] == "rfc822; nobody@dest.test"
        assert r["Action"] == "failed"
        assert r["Status"] == "5.1.1"
        assert r["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
        assert r["Remote-MTA"] == "dns; 127.0.0.1"
        original = parts[2].get_payload()[0]
        assert original["Subject"] == "to bounce"
    finally:
        await core.stop()


async def test_permanent_failure_from_smtp_sink_bounces_once(state, tmp_path, capture):
    """The real smtp-sink refusing RCPT with a hard error; the bounce goes to the sender's
    domain, routed to the capturing server."""
    hard = Sink(tmp_path, ("-f", "RCPT"))
    core = await make_core(state, f"delivery.transports.\"dest.test\"=smtp:[127.0.0.1]:{hard.port}",
                           f"delivery.transports.\"sender.test\"=smtp:[127.0.0.1]:{capture.port}")
    try:
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["bob@dest.test"]), msg(3))
        core.notify(q)
        await wait_for(lambda: capture.handler.to("alice@sender.test"), what="bounce")
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
        await asyncio.sleep(0.5)
        assert len(capture.handler.messages) == 1 and hard.count() == 0
        dsn = parse(capture.handler.messages[0]["data"])
        rcpt = dsn.get_payload()[1].get_payload()[1]
        assert rcpt["Action"] == "failed" and rcpt["Status"].startswith("5.")
    finally:
        await core.stop()
        hard.stop()


async def test_no_bounce_to_the_null_sender_or_with_notify_never(state, capture):
    capture.handler.rcpt_replies["x@dest.test"] = ["550 5.1.1 no"] * 2
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}")
    try:
        q1 = await core.spool.enqueue(Envelope("", ["x@dest.test"]), msg(4))
        q2 = await core.spool.enqueue(Envelope("alice@sender.test", ["x@dest.test"],
                                               rcpt_params={"x@dest.test": {"NOTIFY": "NEVER"}}),
                                      msg(5))
        core.notify(q1)
        core.notify(q2)
        await wait_for(lambda: capture.handler.rcpt_attempts.get("x@dest.test") == 2
                       and not core.spool.ids("active"), what="both attempted")
        await asyncio.sleep(0.5)
        assert capture.handler.messages == []
        assert core.stats["dsn_sent"] == 0
    finally:
        await core.stop()


async def test_4xx_is_retried_on_schedule_then_delivered(state, capture):
    capture.handler.rcpt_replies["bob@dest.test"] = ["451 4.3.0 try again later"] * 2
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}")
    try:
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["bob@dest.test"]), msg(6))
        core.notify(q)
        await wait_for(lambda: capture.handler.rcpt_attempts.get("bob@dest.test") == 1,
                       what="first attempt")
        await wait_for(lambda: core.stats["deferred"] == 1, what="deferral recorded")
        (e,) = core.spool.entries()
        assert e.state.attempts == 1 and e.state.next_attempt > e.state.last_attempt
        assert e.state.recipients["bob@dest.test"].response == "451 4.3.0 try again later"
        await wait_for(lambda: capture.handler.messages, what="delivery after retries")
        assert capture.handler.rcpt_attempts["bob@dest.test"] == 3
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
        assert core.stats["dsn_sent"] == 0
    finally:
        await core.stop()


async def test_temporary_failures_until_max_lifetime_bounce_as_expired(state, capture):
    capture.handler.rcpt_replies["slow@dest.test"] = ["452 4.2.2 mailbox full"] * 100
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}",
                           "delivery.max_lifetime=1500ms",
                           f"delivery.transports.\"sender.test\"=smtp:[127.0.0.1]:{capture.port}")
    try:
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["slow@dest.test"]), msg(7))
        core.notify(q)
        await wait_for(lambda: capture.handler.to("alice@sender.test"), what="expiry bounce")
        (b,) = capture.handler.to("alice@sender.test")
        r = parse(b["data"]).get_payload()[1].get_payload()[1]
        assert r["Action"] == "failed" and r["Status"] == "4.4.7"
        assert "mailbox full" in parse(b["data"]).get_payload()[0].get_payload()
        assert capture.handler.rcpt_attempts["slow@dest.test"] >= 2
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
    finally:
        await core.stop()


async def test_delay_warning_is_sent_once_then_message_delivered(state, capture):
    capture.handler.rcpt_replies["bob@dest.test"] = ["421 4.4.5 busy"] * 3
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}",
                           "delivery.delay_warning=100ms",
                           f"delivery.transports.\"sender.test\"=smtp:[127.0.0.1]:{capture.port}")
    try:
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["bob@dest.test"]), msg(8))
        core.notify(q)
        await wait_for(lambda: capture.handler.to("bob@dest.test"), what="final delivery")
        warnings = capture.handler.to("alice@sender.test")
        assert len(warnings) == 1
        w = parse(warnings[0]["data"])
        assert w["Subject"].startswith("Delayed Mail")
        r = w.get_payload()[1].get_payload()[1]
        assert r["Action"] == "delayed" and r["Will-Retry-Until"]
        assert w.get_payload()[2].get_content_type() == "text/rfc822-headers"
    finally:
        await core.stop()


async def test_restart_recovers_spool_and_keeps_per_recipient_state(state, capture):
    """bob is delivered, carol deferred; the gateway stops; a new one delivers carol only."""
    capture.handler.rcpt_replies["carol@dest.test"] = ["451 4.3.0 later"]
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}",
                           "delivery.retry_initial=1h", "delivery.retry_max=1h")
    q = await core.spool.enqueue(Envelope("alice@sender.test",
                                          ["bob@dest.test", "carol@dest.test"]), msg(9))
    core.notify(q)
    await wait_for(lambda: core.stats["deferred"] == 1, what="carol deferred")
    await core.stop()
    assert len(capture.handler.messages) == 1
    # a message enqueued while no delivery core runs (e.g. accepted just before a crash)
    q2 = await core.spool.enqueue(Envelope("alice@sender.test", ["dave@dest.test"]), msg(10))
    core2 = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}")
    try:
        await wait_for(lambda: capture.handler.to("dave@dest.test"), what="recovered message")
        # carol's retry is due in an hour: `filterd queue flush` semantics make it due now
        with core2.spool.open(q) as h:
            h.state.next_attempt = 0
            h.save_state()
        core2.spool.touch_flush()
        await wait_for(lambda: capture.handler.to("carol@dest.test"), what="carol after flush")
        await wait_for(lambda: not core2.spool.ids("active"), what="spool empty")
        assert len(capture.handler.to("bob@dest.test")) == 1  # never delivered twice
        assert q2
    finally:
        await core2.stop()


async def test_local_domain_delivers_into_maildir(state):
    core = await make_core(state, "delivery.local_domains=[\"example.net\"]")
    try:
        data = msg(11)
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["Bob+tag@Example.NET"]), data)
        core.notify(q)
        md = state / "mail" / "example.net" / "bob" / "Maildir"
        await wait_for(lambda: (md / "new").is_dir() and list((md / "new").iterdir()),
                       what="maildir file")
        (f,) = list((md / "new").iterdir())
        assert f.read_bytes() == data
        assert list((md / "tmp").iterdir()) == []
        await wait_for(lambda: not core.spool.ids("active"), what="spool empty")
    finally:
        await core.stop()


async def test_mx_routing_prefers_lowest_mx_and_falls_back(state, capture):
    # mx1 (preferred) has an address where nothing listens: delivery falls back to mx2
    resolver = FixtureResolver({
        "dest.test": {"MX": ["10 mx1.dest.test.", "20 mx2.dest.test."]},
        "mx1.dest.test": {"A": ["127.0.0.9"]},
        "mx2.dest.test": {"A": ["127.0.0.1"]},
        "implicit.test": {"A": ["127.0.0.1"]},
        "nullmx.test": {"MX": ["0 ."]},
    })
    core = await make_core(state, f"delivery.smtp_port={capture.port}",
                           f"delivery.transports.\"sender.test\"=smtp:[127.0.0.1]:{capture.port}",
                           resolver=resolver)
    try:
        q = await core.spool.enqueue(Envelope("alice@sender.test", ["bob@dest.test",
                                                                     "x@implicit.test"]), msg(12))
        core.notify(q)
        await wait_for(lambda: capture.handler.to("bob@dest.test")
                       and capture.handler.to("x@implicit.test"), what="MX deliveries")
        assert ("mx1.dest.test", "A") in resolver.queries
        q2 = await core.spool.enqueue(Envelope("alice@sender.test", ["y@nullmx.test",
                                                                      "z@nxdomain.test"]), msg(13))
        core.notify(q2)
        await wait_for(lambda: capture.handler.to("alice@sender.test"), what="bounce")
        rcpts = parse(capture.handler.to("alice@sender.test")[0]["data"]).get_payload()[1] \
            .get_payload()[1:]
        got = {r["Final-Recipient"]: r["Status"] for r in rcpts}
        assert got == {"rfc822; y@nullmx.test": "5.1.10", "rfc822; z@nxdomain.test": "5.1.2"}
    finally:
        await core.stop()


async def test_lmtp_per_recipient_replies(state):
    lmtp = await MiniLMTP({"full@dest.test": "452 4.2.2 mailbox full",
                           "gone@dest.test": "550 5.1.1 no such user"}).start()
    core = await make_core(state, f"delivery.relayhost=lmtp:127.0.0.1:{lmtp.port}",
                           "delivery.retry_initial=1h", "delivery.retry_max=1h")
    try:
        q = await core.spool.enqueue(Envelope("", ["ok@dest.test", "full@dest.test",
                                                   "gone@dest.test"]), msg(14))
        core.notify(q)
        await wait_for(lambda: core.stats["deferred"] == 1, what="attempt done")
        assert [r for r, _ in lmtp.delivered] == ["ok@dest.test"]
        (e,) = core.spool.entries()
        st = {r: (s.status, s.response) for r, s in e.state.recipients.items()}
        assert st["ok@dest.test"][0] == "delivered"
        assert st["full@dest.test"] == ("pending", "452 4.2.2 mailbox full")
        assert st["gone@dest.test"] == ("failed", "550 5.1.1 no such user")
    finally:
        await core.stop()
        await lmtp.stop()


async def test_lmtp_over_unix_socket(state, tmp_path):
    path = str(tmp_path / "lmtp.sock")
    lmtp = await MiniLMTP(unix_path=path).start()
    core = await make_core(state, f"delivery.transports.\"dest.test\"=lmtp:unix:{path}")
    try:
        q = await core.spool.enqueue(Envelope("a@sender.test", ["u@dest.test"]), msg(15))
        core.notify(q)
        await wait_for(lambda: lmtp.delivered, what="lmtp delivery")
    finally:
        await core.stop()
        await lmtp.stop()


async def test_opportunistic_starttls_and_required_tls_policy(state, tmp_path):
    cert, key = make_cert(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    tls_server = CaptureServer(tls_context=ctx)
    plain = CaptureServer()
    core = await make_core(state,
                           f"delivery.transports.\"tls.test\"=smtp:[127.0.0.1]:{tls_server.port}",
                           f"delivery.transports.\"plain.test\"=smtp:[127.0.0.1]:{plain.port}",
                           "delivery.tls_policy.\"plain.test\"=encrypt",
                           "delivery.retry_initial=1h", "delivery.retry_max=1h")
    try:
        q = await core.spool.enqueue(Envelope("a@sender.test", ["u@tls.test", "v@plain.test"]),
                                     msg(16))
        core.notify(q)
        await wait_for(lambda: tls_server.handler.messages and core.stats["deferred"] == 1,
                       what="tls delivery + deferral")
        assert tls_server.handler.messages[0]["tls"] is True
        assert plain.handler.messages == []
        (e,) = core.spool.entries()
        why = e.state.recipients["v@plain.test"].response
        assert "TLS is required for plain.test" in why and "STARTTLS" in why
    finally:
        await core.stop()
        tls_server.stop()
        plain.stop()


async def test_pipeline_events_delivered_and_bounced(state, tmp_path, capture, pipeline_factory):
    plugdir = tmp_path / "plugins"
    plugdir.mkdir()
    log = tmp_path / "events.log"
    (plugdir / "recorder.py").write_text(
        "from filterd.hookspecs import hookimpl\n"
        f"LOG = {str(log)!r}\n"
        "@hookimpl\n"
        "def delivered(ctx, recipient, response):\n"
        "    open(LOG, 'a').write(f'delivered {recipient} {ctx.data[\"queue_id\"]}\\n')\n"
        "@hookimpl\n"
        "def bounced(ctx, recipient, response, permanent):\n"
        "    open(LOG, 'a').write(f'bounced {recipient} {permanent}\\n')\n")
    pipe = await pipeline_factory(f"plugins.site_dir={plugdir}")
    capture.handler.rcpt_replies["bad@dest.test"] = ["550 5.1.1 no"]
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}",
                           pipeline=pipe)
    try:
        q = await core.spool.enqueue(Envelope("", ["good@dest.test", "bad@dest.test"]), msg(17))
        core.notify(q)
        await wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2,
                       what="two events")
        lines = sorted(log.read_text().splitlines())
        assert lines == ["bounced bad@dest.test True", f"delivered good@dest.test {q}"]
    finally:
        await core.stop()


async def test_opportunistic_tls_falls_back_to_plain_text_when_the_handshake_fails(state):
    peer = await MiniLMTP(smtp=True, broken_starttls=True).start()
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{peer.port}")
    try:
        q = await core.spool.enqueue(Envelope("a@sender.test", ["u@dest.test"]), msg(18))
        core.notify(q)
        await wait_for(lambda: peer.delivered, what="plain-text delivery after TLS failure")
        assert peer.sessions == 2  # the failed TLS session, then the plain one
    finally:
        await core.stop()
        await peer.stop()


async def test_message_that_keeps_failing_internally_moves_to_failed(state, capture):
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{capture.port}",
                           "queue.max_internal_errors=2")
    real_route = core.router.route

    def broken(rcpt):
        raise RuntimeError("simulated bug in routing")
    core.router.route = broken
    try:
        q = await core.spool.enqueue(Envelope("a@sender.test", ["u@dest.test"]), msg(19))
        core.notify(q)
        await wait_for(lambda: core.spool.ids("failed") == [q] and q not in core._inflight,
                       what="moved to failed/")
        (e,) = core.spool.entries(["failed"])
        assert e.state.internal_errors == 2
        # the operator fixes the cause and requeues: it is delivered
        core.router.route = real_route
        with core.spool.open(q, "failed") as h:
            h.state.internal_errors = 0
            h.save_state()
            h.move("active")
        await wait_for(lambda: capture.handler.to("u@dest.test"), what="delivery after requeue")
    finally:
        await core.stop()


async def test_per_destination_connection_limit(state, sink):
    core = await make_core(state, f"delivery.relayhost=127.0.0.1:{sink.port}",
                           "delivery.max_per_destination=2")
    try:
        ids = await asyncio.gather(*(core.spool.enqueue(
            Envelope("alice@sender.test", ["bob@dest.test"]), msg(i)) for i in range(40)))
        for q in ids:
            core.notify(q)
        await wait_for(lambda: sink.count() == 40 and not core.spool.ids("active"),
                       what="40 messages at smtp-sink")
        assert core.pool.opened == 2  # never more than two sessions, each reused
    finally:
        await core.stop()


async def test_internationalized_address_to_a_server_without_smtputf8_bounces(state, tmp_path):
    peer = await MiniLMTP(smtp=True).start()  # offers no SMTPUTF8
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{peer.port}")
    try:
        q = await core.spool.enqueue(Envelope("", ["jörg@dest.test", "plain@dest.test"],
                                              mail_params={"SMTPUTF8": True}), msg(20))
        core.notify(q)
        await wait_for(lambda: not core.spool.ids("active"), what="attempt done")
        assert peer.delivered == []
        assert core.stats["bounced"] == 2
    finally:
        await core.stop()
        await peer.stop()


async def test_dead_destination_defers_other_messages_without_reconnecting(state):
    from delivery_peers import free_port

    port = free_port()  # nothing listens there
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{port}",
                           "delivery.retry_initial=1h", "delivery.retry_max=1h")
    try:
        q1 = await core.spool.enqueue(Envelope("a@sender.test", ["u@dest.test"]), msg(21))
        core.notify(q1)
        await wait_for(lambda: core.stats["deferred"] == 1, what="first deferral")
        q2 = await core.spool.enqueue(Envelope("a@sender.test", ["v@dest.test"]), msg(22))
        core.notify(q2)
        await wait_for(lambda: core.stats["deferred"] == 2, what="second deferral")
        st = {e.queue_id: e.state.recipients for e in core.spool.entries()}
        first = st[q1]["u@dest.test"].response
        second = st[q2]["v@dest.test"].response
        assert f"connect to 127.0.0.1[127.0.0.1]:{port}" in first
        assert "not retried for 30s" in second and first in second
    finally:
        await core.stop()
