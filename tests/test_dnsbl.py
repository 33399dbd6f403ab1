"""DNSBL / RHSBL / URIBL through fixture DNS, answers cached in both store backends."""
from __future__ import annotations

import pytest
from conftest import DATA, make_message

# fixtures: store, backend, store_overrides, redis_prefix, own_redis (tests/store_fixtures.py)
pytest_plugins = ["store_fixtures"]

from filterd.dns import FixtureResolver
from filterd.model import Session
from filterd.verdict import Action

ZONES = DATA / "reputation" / "dnsbl-zones.toml"

CONF = """
[dnsbl.ip_zones."bl.test"]
"127.0.0.2" = "TEST_RBL_SBL"
"127.0.0.4" = "TEST_RBL_XBL"
"*" = "TEST_RBL_OTHER"
[dnsbl.rhsbl_zones."dbl.test"]
"127.0.1.2" = "TEST_DBL_SPAM"
[dnsbl.uribl_zones."uribl.test"]
"&2" = "TEST_URIBL_BLACK"
"&4" = "TEST_URIBL_GREY"
[scores]
TEST_RBL_SBL = 4.0
TEST_DBL_SPAM = 6.0
"""


def smtp(ip: str) -> Session:
    return Session(peer_ip=ip, front_door="smtp")


@pytest.fixture
async def dnsbl(pipeline_factory, store_overrides, tmp_path):
    conf = tmp_path / "dnsbl.toml"
    conf.write_text(CONF)
    resolver = FixtureResolver.from_file(str(ZONES))

    async def make(*extra):
        pipe = await pipeline_factory(*store_overrides, *extra, config=str(conf),
                                      resolver=resolver)
        return pipe, resolver
    return make


def syms(result):
    return {s.name: s for s in result.ctx.all_symbols()}


async def test_listed_client_ip_becomes_the_zone_symbol_with_its_score(dnsbl):
    pipe, _ = await dnsbl()
    r = await pipe.scan(make_message(), "a@ok.test", ["u@example.org"], smtp("198.51.100.7"))
    s = syms(r)
    assert s["TEST_RBL_SBL"].score == 4.0 and "127.0.0.2" in s["TEST_RBL_SBL"].options
    r = await pipe.scan(make_message(), "a@ok.test", ["u@example.org"], smtp("198.51.100.8"))
    assert {"TEST_RBL_XBL", "TEST_RBL_OTHER"} <= set(syms(r))  # 127.0.0.10 -> "*"
    r = await pipe.scan(make_message(), "a@ok.test", ["u@example.org"], smtp("198.51.100.99"))
    assert not any(n.startswith("TEST_") for n in syms(r))


async def test_list_error_codes_are_not_scored(dnsbl):
    pipe, _ = await dnsbl()
    r = await pipe.scan(make_message(), "a@ok.test", ["u@example.org"], smtp("198.51.100.9"))
    assert not any(n.startswith("TEST_") for n in syms(r))


async def test_dns_failure_is_a_zero_symbol_never_a_deferral(dnsbl):
    pipe, _ = await dnsbl()
    r = await pipe.scan(make_message(), "a@ok.test", ["u@example.org"], smtp("198.51.100.10"))
    assert "DNSBL_FAIL" in syms(r) and r.action is Action.ACCEPT


async def test_private_clients_are_not_looked_up_unless_asked(dnsbl):
    pipe, resolver = await dnsbl()
    await pipe.scan(make_message(), "", ["u@example.org"], smtp("10.1.2.3"))
    assert not any(q.startswith("3.2.1.10.") for q, _ in resolver.queries)
    pipe, resolver = await dnsbl("dnsbl.check_private=true")
    await pipe.scan(make_message(), "", ["u@example.org"], smtp("10.1.2.3"))
    assert ("3.2.1.10.bl.test", "A") in resolver.queries


async def test_sender_domains_against_rhsbl(dnsbl):
    pipe, _ = await dnsbl()
    r = await pipe.scan(make_message(), "x@spammer.test", ["u@example.org"], smtp("203.0.113.1"))
    assert "spammer.test" in syms(r)["TEST_DBL_SPAM"].options
    r = await pipe.scan(make_message(sender="boss@spammer.test"), "bounce@ok.test",
                        ["u@example.org"], smtp("203.0.113.1"))
    assert "TEST_DBL_SPAM" in syms(r)  # From: header domain


async def test_url_domains_against_uribl_with_bitmask_codes(dnsbl):
    pipe, _ = await dnsbl()
    body = ("See https://www.evil-links.test/offer and http://203.0.113.66/x and "
            "https://fine.test/\r\n")
    r = await pipe.scan(make_message(body=body), "a@ok.test", ["u@example.org"],
                        smtp("203.0.113.2"))
    s = syms(r)
    assert "www.evil-links.test" in s["TEST_URIBL_BLACK"].options  # registered domain queried
    assert "TEST_URIBL_GREY" in s  # 127.0.0.6 = bits 2 and 4


async def test_answers_are_cached_in_the_store(dnsbl):
    pipe, resolver = await dnsbl()
    for _ in range(2):
        r = await pipe.scan(make_message(), "x@spammer.test", ["u@example.org"],
                            smtp("198.51.100.7"))
        assert {"TEST_RBL_SBL", "TEST_DBL_SPAM"} <= set(syms(r))
    asked = [q for q, _ in resolver.queries if q.endswith((".bl.test", ".dbl.test"))]
    assert sorted(asked) == sorted(set(asked))  # each name queried once
    keys = await pipe.services.store.keys("dnsbl:")
    assert "dnsbl:7.100.51.198.bl.test" in keys
    # a second node sharing the store does not ask DNS again
    pipe2, _ = await dnsbl()
    before = len(resolver.queries)
    await pipe2.scan(make_message(), "x@spammer.test", ["u@example.org"], smtp("198.51.100.7"))
    assert [q for q, _ in resolver.queries[before:] if q.endswith((".bl.test", ".dbl.test"))] == []


async def test_no_zone_is_configured_by_default(pipeline_factory, store_overrides):
    resolver = FixtureResolver.from_file(str(ZONES))
    pipe = await pipeline_factory(*store_overrides, resolver=resolver)
    await pipe.scan(make_message(), "x@spammer.test", ["u@example.org"], smtp("198.51.100.7"))
    # sender authentication (SPF, DMARC) asks DNS; no block list is asked about the client,
    # the sender or the links
    assert [q for q, _ in resolver.queries
            if "7.100.51.198" in q or q.endswith((".bl.test", ".dbl.test"))] == []
