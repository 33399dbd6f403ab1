"""FixtureResolver features the authentication suites rely on: CNAME chains followed like a
recursive resolver, loops as errors, and "*" for every type a name does not list."""
from __future__ import annotations

import pytest

from filterd.dns import DNSError, FixtureResolver


async def test_cname_chain_is_followed_for_other_types():
    r = FixtureResolver({"a.example": {"CNAME": ["b.example."]},
                         "b.example": {"CNAME": ["c.example"]},
                         "c.example": {"A": ["192.0.2.1"], "TXT": ["v=spf1 -all"]}})
    assert (await r.query("a.example", "A")).records == ["192.0.2.1"]
    assert await r.txt("A.Example.") == ["v=spf1 -all"]
    assert (await r.query("a.example", "CNAME")).records == ["b.example."]
    assert (await r.query("a.example", "MX")).records == []


@pytest.mark.parametrize("zones", [
    {"loop.example": {"CNAME": ["loop.example"]}},
    {"x.example": {"CNAME": ["y.example"]}, "y.example": {"CNAME": ["x.example"]}},
    {f"c{i}.example": {"CNAME": [f"c{i + 1}.example"]} for i in range(20)},
])
async def test_cname_loops_and_long_chains_are_dns_errors(zones):
    first = next(iter(zones))
    with pytest.raises(DNSError, match="CNAME"):
        await FixtureResolver(zones).query(first, "A")


async def test_star_type_applies_to_unlisted_types():
    r = FixtureResolver({"t.example": {"TXT": ["v=spf1 -all"], "*": "TIMEOUT"}})
    assert await r.txt("t.example") == ["v=spf1 -all"]
    with pytest.raises(DNSError):
        await r.query("t.example", "A")
    assert (await r.query("missing.example", "A")).nxdomain
