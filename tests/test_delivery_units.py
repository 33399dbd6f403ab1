"""Unit tests of delivery logic that needs no peer: DSN structure, NOTIFY rules, transport
specs and routing order, retry schedule, data preparation."""
from __future__ import annotations

import email
import email.policy

import pytest

from filterd import config as config_mod
from filterd.delivery.client import Reply, prepare_data
from filterd.delivery.dsn import RecipientReport, build_dsn, dsn_envelope, wants_notify
from filterd.delivery.routing import Route, RouteError, Router, parse_transport
from filterd.dns import FixtureResolver
from filterd.queue import Envelope

ORIG = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nbody \xc3\xa9\r\n"


def _parse(b: bytes):
    return email.message_from_bytes(b, policy=email.policy.compat32)


def test_dsn_has_the_rfc3464_parts_and_fields():
    env = Envelope("a@sender.test", ["b@dest.test"], queue_id="Q1", received_at=1_700_000_000,
                   mail_params={"ENVID": "e1"},
                   rcpt_params={"b@dest.test": {"ORCPT": "rfc822;B@dest.test"}})
    raw = build_dsn(env, ORIG, [RecipientReport("b@dest.test", "failed", "5.1.1",
                                                "550 5.1.1 unknown user", "mx.dest.test",
                                                1_700_000_100)], "gw.test")
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    m = _parse(raw)
    assert m["From"] == "Mail Delivery System <MAILER-DAEMON@gw.test>"
    assert m.get_content_type() == "multipart/report"
    text, status, original = m.get_payload()
    assert "550 5.1.1 unknown user" in text.get_payload()
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; gw.test"
    assert blocks[0]["Original-Envelope-Id"] == "e1"
    assert blocks[0]["Arrival-Date"]
    r = blocks[1]
    assert (r["Final-Recipient"], r["Original-Recipient"], r["Action"], r["Status"],
            r["Remote-MTA"], r["Diagnostic-Code"]) == (
        "rfc822; b@dest.test", "rfc822;B@dest.test", "failed", "5.1.1", "dns; mx.dest.test",
        "smtp; 550 5.1.1 unknown user")
    assert original.get_content_type() == "message/rfc822"
    assert original["Content-Transfer-Encoding"] == "8bit"
    assert original.get_payload()[0]["Subject"] == "hi"


def test_dsn_returns_headers_only_for_ret_hdrs_and_big_messages():
    env = Envelope("a@sender.test", ["b@dest.test"], mail_params={"RET": "HDRS"})
    rep = [RecipientReport("b@dest.test", "failed", "5.0.0", text="no route")]
    m = _parse(build_dsn(env, ORIG, rep, "gw.test"))
    assert m.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"body" not in m.get_payload()[2].get_payload().encode()
    m = _parse(build_dsn(Envelope("a@s.test", ["b@d.test"]), ORIG * 100, rep, "gw.test",
                         max_body=1000))
    assert m.get_payload()[2].get_content_type() == "text/rfc822-headers"
    # our own explanation is in the text part, and no Diagnostic-Code pretends it was remote
    assert "no route" in m.get_payload()[0].get_payload()
    assert m.get_payload()[1].get_payload()[1]["Diagnostic-Code"] is None


@pytest.mark.parametrize("sender,notify,kind,expected", [
    ("a@s.test", None, "FAILURE", True),
    ("a@s.test", None, "DELAY", True),
    ("", None, "FAILURE", False),  # never to the null sender
    ("a@s.test", "NEVER", "FAILURE", False),
    ("a@s.test", "SUCCESS", "FAILURE", False),
    ("a@s.test", "FAILURE", "DELAY", False),
    ("a@s.test", "success,failure", "FAILURE", True),
])
def test_notify_rules(sender, notify, kind, expected):
    env = Envelope(sender, ["b@d.test"],
                   rcpt_params={"b@d.test": {"NOTIFY": notify}} if notify else {})
    assert wants_notify(env, "b@d.test", kind) is expected


def test_dsn_envelope_is_from_the_null_sender_to_the_original_sender():
    e = dsn_envelope(Envelope("a@s.test", ["b@d.test"], queue_id="Q"))
    assert e.mail_from == "" and e.recipients == ["a@s.test"] and e.meta["dsn_for"] == "Q"


@pytest.mark.parametrize("spec,route", [
    ("local", Route("local")),
    ("mx", Route("mx")),
    ("smtp:[10.0.0.5]:2525", Route("smtp", "10.0.0.5", 2525)),
    ("smtp:relay.example:587", Route("smtp", "relay.example", 587)),
    ("[127.0.0.1]:10026", Route("smtp", "127.0.0.1", 10026)),
    ("relay.example", Route("smtp", "relay.example", 25)),
    ("lmtp:127.0.0.1:24", Route("lmtp", "127.0.0.1", 24)),
    ("lmtp:mail.example", Route("lmtp", "mail.example", 24)),
    ("lmtp:unix:/run/dovecot/lmtp", Route("lmtp", unix_path="/run/dovecot/lmtp")),
])
def test_transport_specs(spec, route):
    assert parse_transport(spec) == route


def _router(tmp_path, text: str = "", *sets: str, zones=None) -> Router:
    p = tmp_path / "f.toml"
    p.write_text(text)
    cfg = config_mod.load(str(p), [f"server.state_dir={tmp_path}", *sets], use_default_path=False)
    res = FixtureResolver(zones or {})
    return Router(cfg, lambda: res)


def test_routing_order_local_then_transports_then_relayhost_then_mx(tmp_path):
    r = _router(tmp_path, '[delivery]\nlocal_domains = ["home.test"]\n'
                          '[delivery.transports]\n"corp.test" = "smtp:[10.1.1.1]:25"\n'
                          '".sub.test" = "lmtp:127.0.0.1:24"\n"direct.test" = "mx"\n')
    assert r.route("u@HOME.test").kind == "local"
    assert r.route("u@corp.test") == Route("smtp", "10.1.1.1", 25)
    assert r.route("u@a.b.sub.test") == Route("lmtp", "127.0.0.1", 24)
    assert r.route("u@other.test") == Route("mx", "other.test", 25)
    r2 = _router(tmp_path, '[delivery]\nrelayhost = "[127.0.0.1]:10026"\n'
                           '[delivery.transports]\n"direct.test" = "mx"\n')
    assert r2.route("u@other.test") == Route("smtp", "127.0.0.1", 10026)
    assert r2.route("u@direct.test") == Route("mx", "direct.test", 25)


async def test_mx_resolution_rules(tmp_path):
    r = _router(tmp_path, zones={
        "d.test": {"MX": ["20 b.d.test.", "10 a.d.test."]},
        "a.d.test": {"A": ["192.0.2.1"], "AAAA": ["2001:db8::1"]},
        "b.d.test": {"A": ["192.0.2.2"]},
        "impl.test": {"A": ["192.0.2.3"]},
        "null.test": {"MX": ["0 ."]},
        "tmp.test": {"MX": "TIMEOUT"},
        "noaddr.test": {"MX": ["10 nowhere.test."]},
    })
    assert await r.next_hops(Route("mx", "d.test")) == [
        ("a.d.test", "192.0.2.1"), ("a.d.test", "2001:db8::1"), ("b.d.test", "192.0.2.2")]
    assert await r.next_hops(Route("mx", "impl.test")) == [("impl.test", "192.0.2.3")]
    for dom, permanent, status in (("null.test", True, "5.1.10"), ("nx.test", True, "5.1.2"),
                                   ("tmp.test", False, "4.4.3"),
                                   ("noaddr.test", False, "4.4.3")):
        with pytest.raises(RouteError) as ei:
            await r.next_hops(Route("mx", dom))
        assert (ei.value.permanent, ei.value.status) == (permanent, status), dom


def test_retry_schedule_is_exponential_and_capped(tmp_path):
    from filterd.delivery.core import DeliveryCore
    from filterd.queue import Spool
    from filterd.services import Services

    cfg = config_mod.load(None, [f"server.state_dir={tmp_path}"], use_default_path=False)
    core = DeliveryCore(cfg, Spool(tmp_path / "spool"), Services(cfg))
    assert [core._backoff(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4800, 7200]
    assert core.max_lifetime == 5 * 86400 and core.delay_warning == 4 * 3600


def test_prepare_data_dot_stuffs_and_normalises_line_ends():
    assert prepare_data(b".a\r\nb\r\n.c\r\n") == b"..a\r\nb\r\n..c\r\n.\r\n"
    assert prepare_data(b"a\nb") == b"a\r\nb\r\n.\r\n"
    assert prepare_data(b"x\r\n") == b"x\r\n.\r\n"


def test_reply_kinds_and_enhanced_codes():
    assert Reply(250, ["2.0.0 ok"]).kind == "ok"
    assert Reply(451, ["4.3.0 later"]).kind == "temp"
    assert Reply(550, ["5.1.1 no", "more"]).enhanced == "5.1.1"
    assert Reply(554, ["no code"]).enhanced == "" and Reply(554, []).kind == "perm"
