"""SPF plugin: the OpenSPF RFC 7208 and RFC 4408 suites, every test through the plugin (in a real
pipeline) and filterd's DNS test double, plus bad-input cases."""
from __future__ import annotations

import pytest

from filterd.dns import FixtureResolver
from filterd.model import Session

from auth_fixtures import load_spf_suite

SUITE = load_spf_suite("rfc7208-tests.yml") + load_spf_suite("rfc4408-tests.yml")


@pytest.mark.parametrize("test,zones", [(t, z) for _, t, z in SUITE],
                         ids=[i for i, _, _ in SUITE])
async def test_spf_suite(pipeline_factory, test, zones):
    resolver = FixtureResolver(zones)
    pipe = await pipeline_factory("spf.default_explanation=DEFAULT", resolver=resolver)
    session = Session(peer_ip=test["host"], helo=test.get("helo", ""))
    result = await pipe.scan(b"From: x@example.com\r\nSubject: t\r\n\r\nbody\r\n",
                             test.get("mailfrom", ""), ["rcpt@example.net"], session)
    spf = result.ctx.data["spf"]["mailfrom"]
    expected = test["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    assert spf.result in allowed, f"{test.get('description', '')} got {spf.result}: {spf.explanation}"
    assert f"SPF_{spf.result.upper()}" in result.ctx.symbols
    if "explanation" in test and spf.result == "fail":
        assert spf.explanation == test["explanation"]
