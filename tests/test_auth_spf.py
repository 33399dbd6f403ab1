"""SPF plugin: the OpenSPF RFC 7208 and RFC 4408 suites, every test through the plugin (in a real
pipeline) and filterd's DNS test double, plus bad-input cases."""
from __future__ import annotations

import pytest

from filterd.dns import FixtureResolver
from filterd.model import Session

from auth_fixtures import load_spf_suite

SUITE = load_spf_suite("rfc7208-tests.yml") + load_spf_suite("rfc4408-tests.yml")


@pytest.fixture(params=["in-loop", "in-thread"])
def spf_evaluation(request, monkeypatch):
    """Every suite case both ways an evaluation can run: replayed in the event loop as its DNS
    answers arrive, and (past plugins.spf.REPLAYS answers) finished in a worker thread."""
    import filterd_plugins.spf as spf_plugin

    monkeypatch.setattr(spf_plugin, "REPLAYS", 1000 if request.param == "in-loop" else 0)
    return request.param


@pytest.mark.parametrize("test,zones", [(t, z) for _, t, z in SUITE],
                         ids=[i for i, _, _ in SUITE])
async def test_spf_suite(pipeline_factory, test, zones, spf_evaluation):
    resolver = FixtureResolver(zones)
    pipe = await pipeline_factory("spf.default_explanation=DEFAULT", resolver=resolver)
    session = Session(peer_ip=test["host"], helo=test.get("helo", ""))
    result = await pipe.scan(b"From: x@example.com\r\nSubject: t\r\n\r\nbody\r\n",
                             test.get("mailfrom", ""), ["rcpt@example.net"], session)
    spf = result.ctx.data["spf"]["mailfrom"]
    expected = test["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    assert spf.result in allowed, (
        f"{test.get('description', '')} got {spf.result}: {spf.explanation}")
    assert f"SPF_{spf.result.upper()}" in result.ctx.symbols
    if "explanation" in test and spf.result == "fail":
        assert spf.explanation == test["explanation"]


# -- bad input beyond the suites: each ends in the RFC result and the message is still scored --
BAD = {
    "malformed.example": {"TXT": ["v=spf1 ip4:300.1.2.3 -all"]},
    "loop.example": {"TXT": ["v=spf1 include:loop2.example -all"]},
    "loop2.example": {"TXT": ["v=spf1 include:loop.example -all"]},
    "void.example": {"TXT": ["v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example -all"]},
    "many.example": {"TXT": ["v=spf1 " + " ".join(f"a:h{i}.many.example" for i in range(12))
                             + " -all"]},
    "slow.example": {"TXT": "TIMEOUT"},
    "two.example": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
    "cname.example": {"CNAME": ["cname.example"]},
    **{f"h{i}.many.example": {"A": ["198.51.100.1"]} for i in range(12)},
}


@pytest.mark.parametrize("domain,expected", [
    ("malformed.example", "permerror"), ("loop.example", "permerror"),
    ("void.example", "permerror"), ("many.example", "permerror"),
    ("slow.example", "temperror"), ("two.example", "permerror"),
    ("cname.example", "temperror"), ("nonexistent.example", "none"),
])
async def test_bad_spf_input_gives_rfc_result(pipeline_factory, domain, expected):
    pipe = await pipeline_factory(resolver=FixtureResolver(BAD))
    result = await pipe.scan(b"From: a@example.com\r\n\r\nhi\r\n", f"x@{domain}",
                             ["rcpt@example.net"], Session(peer_ip="192.0.2.9", helo="h.test"))
    assert result.ctx.data["spf"]["mailfrom"].result == expected
    assert f"SPF_{expected.upper()}" in result.ctx.symbols
    assert result.outcomes["rcpt@example.net"].score == result.ctx.score_for("rcpt@example.net")
    assert not result.ctx.errors


async def test_reject_on_fail_refuses_at_mail_from(pipeline_factory):
    pipe = await pipeline_factory("spf.reject_on_fail=true",
                                  resolver=FixtureResolver({"example.org": {
                                      "TXT": ["v=spf1 -all exp=why.example.org"]},
                                      "why.example.org": {"TXT": ["%{i} may not send for %{d}"]}}))
    ctx = pipe.begin(Session(peer_ip="192.0.2.9", helo="h.test"))
    verdict = await pipe.mail_from(ctx, "x@example.org")
    assert verdict is not None and verdict.smtp_reply()[0] == 550
    assert "192.0.2.9 may not send for example.org" in verdict.reason


async def test_helo_checked_once_per_session(pipeline_factory):
    res = FixtureResolver({"h.test": {"TXT": ["v=spf1 ip4:192.0.2.9 -all"]},
                           "example.org": {"TXT": ["v=spf1 ?all"]}})
    pipe = await pipeline_factory(resolver=res)
    session = Session(peer_ip="192.0.2.9", helo="h.test")
    for _ in range(3):
        r = await pipe.scan(b"From: a@example.org\r\n\r\nhi\r\n", "x@example.org", ["r@x.net"],
                            session)
        assert r.ctx.data["spf"]["helo"].result == "pass"
        assert r.ctx.data["spf"]["mailfrom"].result == "neutral"
    assert res.queries.count(("h.test", "TXT")) == 1
