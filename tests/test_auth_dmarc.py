"""DMARC with fixture DNS: relaxed/strict alignment, subdomain policy, no record, temperror,
pct, local overrides, several From headers, From without a domain, aggregate data."""
from __future__ import annotations

import pytest

from filterd.auth import org_domain
from filterd.dns import FixtureResolver
from filterd.model import Session
from filterd.verdict import Action
from filterd_plugins.dkim import sign_message

from auth_fixtures import DATA

KEY = (DATA / "dkim" / "test.private").read_bytes()
PUB = (DATA / "dkim" / "test.txt").read_text().strip()
IP = "192.0.2.1"


def zones(**dmarc) -> dict:
    z = {
        "test._domainkey.mail.example.com": {"TXT": [PUB]},
        "test._domainkey.example.com": {"TXT": [PUB]},
        "test._domainkey.other.example": {"TXT": [PUB]},
        "bounce.example.com": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "example.com": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "other.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    }
    for name, rec in dmarc.items():
        z[f"_dmarc.{name.replace('_', '.')}"] = {"TXT": rec} if rec == "TIMEOUT" else \
            {"TXT": [rec]}
    return z


def message(from_hdr: str = "Alice <alice@example.com>", sign_d: str | None = None,
            extra: str = "") -> bytes:
    raw = (f"From: {from_hdr}\r\n{extra}To: bob@example.net\r\nSubject: Report\r\n"
           "Date: Fri, 27 Nov 2026 08:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\n"
           "The numbers.\r\n").encode()
    if sign_d:
        value = sign_message(raw, sign_d, "test", KEY, headers=["from", "to", "subject"])
        raw = b"DKIM-Signature: " + value.encode() + b"\r\n" + raw
    return raw


async def scan(pipeline_factory, z, raw, mail_from="", ip=IP, *overrides):
    pipe = await pipeline_factory(*overrides, resolver=FixtureResolver(z))
    return await pipe.scan(raw, mail_from, ["bob@example.net"],
                           Session(peer_ip=ip, helo="mta.other.example", front_door="smtp"))


@pytest.mark.parametrize("record,sign_d,mail_from,expected", [
    ("v=DMARC1; p=reject", "mail.example.com", "", "pass"),  # relaxed DKIM
    ("v=DMARC1; p=reject; adkim=s", "mail.example.com", "", "fail"),  # strict DKIM
    ("v=DMARC1; p=reject; adkim=s", "example.com", "", "pass"),
    ("v=DMARC1; p=reject", None, "x@bounce.example.com", "pass"),  # relaxed SPF
    ("v=DMARC1; p=reject; aspf=s", None, "x@bounce.example.com", "fail"),  # strict SPF
    ("v=DMARC1; p=reject", None, "x@other.example", "fail"),  # SPF pass, not aligned
    ("v=DMARC1; p=reject", "other.example", "", "fail"),  # DKIM pass, not aligned
])
async def test_alignment(pipeline_factory, record, sign_d, mail_from, expected):
    r = await scan(pipeline_factory, zones(example_com=record), message(sign_d=sign_d),
                   mail_from)
    d = r.ctx.data["dmarc"]
    assert d.result == expected, d
    assert f"DMARC_{expected.upper()}" in r.ctx.symbols
    if expected == "fail":
        assert r.action is Action.REJECT
        assert "DMARC policy of example.com" in r.outcomes["bob@example.net"].verdict.reason
    else:
        assert r.action is not Action.REJECT


async def test_subdomain_policy_from_org_domain(pipeline_factory):
    z = zones(example_com="v=DMARC1; p=reject; sp=quarantine")
    r = await scan(pipeline_factory, z, message("a@news.example.com"))
    d = r.ctx.data["dmarc"]
    assert (d.result, d.policy_domain, d.policy, d.disposition) == \
        ("fail", "example.com", "quarantine", "quarantine")
    assert r.action is Action.QUARANTINE


async def test_subdomain_record_wins_over_org(pipeline_factory):
    z = zones(example_com="v=DMARC1; p=reject", news_example_com="v=DMARC1; p=none")
    r = await scan(pipeline_factory, z, message("a@news.example.com"))
    d = r.ctx.data["dmarc"]
    assert (d.result, d.policy_domain, d.policy) == ("fail", "news.example.com", "none")
    assert r.action is not Action.REJECT


async def test_no_record_is_none(pipeline_factory):
    r = await scan(pipeline_factory, zones(), message())
    assert r.ctx.data["dmarc"].result == "none"
    assert "DMARC_NONE" in r.ctx.symbols


async def test_dns_failure_is_temperror(pipeline_factory):
    r = await scan(pipeline_factory, zones(example_com="TIMEOUT"), message())
    assert r.ctx.data["dmarc"].result == "temperror"
    assert r.action is not Action.REJECT


async def test_invalid_and_duplicate_records_are_no_policy(pipeline_factory):
    z = zones(example_com="v=DMARC1; p=bogus")
    r = await scan(pipeline_factory, z, message())
    assert r.ctx.data["dmarc"].result == "none"
    z = zones()
    z["_dmarc.example.com"] = {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]}
    r = await scan(pipeline_factory, z, message())
    assert r.ctx.data["dmarc"].result == "none"


async def test_pct_zero_softens_reject_to_quarantine(pipeline_factory):
    r = await scan(pipeline_factory, zones(example_com="v=DMARC1; p=reject; pct=0"), message())
    d = r.ctx.data["dmarc"]
    assert (d.result, d.policy, d.disposition) == ("fail", "reject", "quarantine")
    assert r.action is Action.QUARANTINE


async def test_admin_can_soften_reject_to_score(pipeline_factory):
    r = await scan(pipeline_factory, zones(example_com="v=DMARC1; p=reject"), message(), "",
                   IP, "dmarc.on_reject=score")
    assert r.ctx.data["dmarc"].result == "fail"
    assert "DMARC_POLICY_REJECT" in r.ctx.symbols
    assert r.outcomes["bob@example.net"].verdict.source != "dmarc"


async def test_never_enforce_domains(pipeline_factory):
    r = await scan(pipeline_factory, zones(example_com="v=DMARC1; p=reject"),
                   message("a@lists.example.com"), "", IP,
                   'dmarc.never_enforce=["example.com"]')
    assert r.ctx.data["dmarc"].result == "fail"
    assert r.action is not Action.REJECT


async def test_second_from_header_cannot_dodge_policy(pipeline_factory):
    z = zones(example_com="v=DMARC1; p=reject")
    raw = message("Eve <eve@other.example>", extra="From: Boss <boss@example.com>\r\n")
    r = await scan(pipeline_factory, z, raw, "x@other.example")
    assert r.ctx.data["dmarc"].domain == "example.com"
    assert r.ctx.data["dmarc"].result == "fail"
    assert "DMARC_MULTIPLE_FROM" in r.ctx.symbols
    assert r.action is Action.REJECT


@pytest.mark.parametrize("from_hdr", ["undisclosed-recipients:;", "alice", "<>"])
async def test_from_without_domain_is_permerror_and_scored(pipeline_factory, from_hdr):
    r = await scan(pipeline_factory, zones(example_com="v=DMARC1; p=reject"),
                   message(from_hdr))
    assert r.ctx.data["dmarc"].result == "permerror"
    assert "DMARC_PERMERROR" in r.ctx.symbols
    assert r.outcomes  # the message was still scored


async def test_aggregate_report_data_is_stored(pipeline_factory):
    z = zones(example_com="v=DMARC1; p=none; rua=mailto:d@example.com")
    r = await scan(pipeline_factory, z, message(), "")
    await scan(pipeline_factory, z, message(sign_d="example.com"), "")
    store = r.ctx.services.store
    keys = await store.keys("dmarc:agg:")
    assert len(keys) == 1 and keys[0].endswith(":example.com")
    counts = await store.hgetall(keys[0])
    # both pipelines share the test's state directory: one unaligned, one DKIM-aligned message
    assert counts == {f"{IP}|none|fail|fail|example.com": 1,
                      f"{IP}|none|pass|fail|example.com": 1}
    assert (await store.get_json(keys[0].replace(":agg:", ":policy:")))["p"] == "none"


def test_org_domain_uses_public_suffix_list():
    assert org_domain("a.b.example.co.uk") == "example.co.uk"
    assert org_domain("mail.example.com") == "example.com"
    assert org_domain("example.com") == "example.com"


async def test_public_suffix_list_loads_at_startup_once_for_every_plugin(pipeline_factory,
                                                                         monkeypatch, tmp_path):
    # the list takes a quarter of a second to load: a pipeline's start-up loads it, not the
    # first message, and the DNSBL plugin's URL look-ups use the same copy as DMARC
    from filterd import auth

    monkeypatch.setattr(auth, "_psl", None)
    await pipeline_factory()  # the default plugins: DMARC loads it
    psl = auth._psl
    assert psl is not None
    conf = tmp_path / "uribl.toml"
    conf.write_text('[dnsbl.uribl_zones."uribl.test"]\n"&2" = "TEST_URIBL_BLACK"\n')
    pipe = await pipeline_factory(config=str(conf))  # a second pipeline loads nothing
    assert auth._psl is psl and auth.public_suffix_list() is psl
    dnsbl = pipe.host.pm.get_plugin("dnsbl")
    assert dnsbl.registered_domain("www.Example.co.uk.") == "example.co.uk"
    monkeypatch.setattr(auth, "_psl", None)
    await pipeline_factory("plugins.disabled=[\"dmarc\"]", config=str(conf))
    assert auth._psl is not None  # DNSBL with URL zones loads it too, without DMARC


async def test_trusted_arc_sealer_overrides_dmarc_failure(pipeline_factory, tmp_path):
    """A list at lists.example.org checks the author's mail (DKIM pass, DMARC pass), tags the
    subject (breaking the DKIM signature) and seals. The receiver sees DMARC fail; it enforces
    p=reject unless it trusts the list's ARC seal."""
    z = zones(example_com="v=DMARC1; p=reject")
    z["test._domainkey.lists.example.org"] = {"TXT": [PUB]}
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "tag.toml").write_text("[actions]\nrewrite_subject = -100.0\n")
    list_cfg = tmp_path / "list.toml"
    list_cfg.write_text(f"""
[auth]
authserv_id = "mx.lists.example.org"
[rules]
site_dir = "{rules}"
[arc]
seal = "inbound"
domain = "lists.example.org"
selector = "test"
key = "{DATA / 'dkim' / 'test.private'}"
""")
    at_list = await pipeline_factory(config=str(list_cfg), resolver=FixtureResolver(z))
    r1 = await at_list.scan(message(sign_d="example.com"), "alice@example.com",
                            ["team@lists.example.org"], Session(peer_ip=IP, front_door="smtp"))
    assert r1.ctx.data["dmarc"].result == "pass"
    forwarded = r1.message_bytes()
    assert b"Subject: [SPAM] Report" in forwarded and b"ARC-Seal:" in forwarded

    async def receive(*overrides):
        pipe = await pipeline_factory(*overrides, resolver=FixtureResolver(z))
        return await pipe.scan(forwarded, "team-bounces@lists.example.org", ["bob@example.net"],
                               Session(peer_ip="203.0.113.50", front_door="smtp"))

    plain = await receive()
    assert plain.ctx.data["dmarc"].result == "fail"
    assert plain.ctx.data["arc"].result == "pass"
    assert plain.action is Action.REJECT
    trusted = await receive('dmarc.trusted_arc_sealers=["example.org"]')
    d = trusted.ctx.data["dmarc"]
    assert (d.result, d.disposition) == ("fail", "none")
    assert "DMARC_ARC_OVERRIDE" in trusted.ctx.symbols
    assert trusted.action is not Action.REJECT
    untrusted = await receive('dmarc.trusted_arc_sealers=["other.example"]')
    assert untrusted.action is Action.REJECT
