"""Unit tests of the front door's own logic: path parsing, relay decisions, the end-of-DATA
disposition policy, and the DATA framing (only CRLF.CRLF ends DATA)."""
from __future__ import annotations

import asyncio

import pytest

from filterd.smtp.relay import AddressError, RelayPolicy, address_tricks, parse_path
from filterd.smtp.server import Input, Settings, content_problem, dispose, unstuff
from filterd.verdict import Action, Verdict


def test_parse_path_with_params_and_quotes():
    p = parse_path('<"a > b"@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8')
    assert p.address == '"a > b"@example.com'
    assert p.params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": ""}
    assert parse_path("<>").address == ""
    assert parse_path("<@a.example,@b.example:u@c.example>").source_route == "@a.example,@b.example"


@pytest.mark.parametrize("bad", ["a@example.com", "<a@example.com", "<a@example.com>x",
                                 "<noat>", "<a@example.com> =x", "<jörg@example.com>"])
def test_parse_path_refuses_bad_syntax(bad):
    with pytest.raises(AddressError):
        parse_path(bad)


def test_utf8_needs_smtputf8():
    assert parse_path("<jörg@example.com>", smtputf8=True).address == "jörg@example.com"


@pytest.mark.parametrize("addr", ["u%o@l.test", "o!u@l.test", '"u@o"@l.test', "u@o@l.test",
                                  "u@[1.2.3.4]", "u@l.test.", "u@.l.test", "u@l..test"])
def test_address_tricks_are_named(addr):
    assert address_tricks(parse_path(f"<{addr}>")) is not None


def test_plain_addresses_are_not_tricks():
    for a in ("user@l.test", "first.last+tag@sub.l.test", '"john doe"@l.test'):
        assert address_tricks(parse_path(f"<{a}>")) is None


def test_relay_decisions():
    import ipaddress
    pol = RelayPolicy(local_domains={"l.test"}, relay_domains={"r.test"},
                      mynetworks=[ipaddress.ip_network("10.0.0.0/8")],
                      recipients={"@l.test", "known@r.test"})
    ok = lambda a, ip="192.0.2.1", user="": pol.check_recipient(parse_path(f"<{a}>"), ip, user)  # noqa
    assert ok("x@l.test") is None
    assert ok("known@r.test") is None
    assert ok("unknown@r.test").enhanced == "5.1.1"
    assert ok("x@elsewhere.test").reason.endswith("Relay access denied")
    assert ok("x@elsewhere.test", ip="10.1.2.3") is None
    assert ok("x@elsewhere.test", ip="::ffff:10.1.2.3") is None
    assert ok("x@elsewhere.test", user="alice") is None
    assert ok("x%y@l.test", ip="10.1.2.3") is not None  # tricks: refused for trusted too


class _O:
    def __init__(self, action, verdict=None):
        self.action = action
        self.verdict = verdict or Verdict(action)


class _R:
    def __init__(self, **outcomes):
        self.outcomes = {k.replace("_", "@"): v for k, v in outcomes.items()}


def test_dispose_policy():
    d = dispose(_R(a_x=_O(Action.ACCEPT), b_x=_O(Action.REJECT, Verdict.reject("no"))))
    assert d.reply is None and d.deliver == ["a@x"] and list(d.dropped) == ["b@x"]
    d = dispose(_R(a_x=_O(Action.ACCEPT), b_x=_O(Action.TEMPFAIL, Verdict.tempfail("later"))))
    assert d.reply[0] == 451
    d = dispose(_R(a_x=_O(Action.REJECT, Verdict.reject("no", code=554))))
    assert d.reply[0] == 554
    d = dispose(_R(a_x=_O(Action.QUARANTINE), b_x=_O(Action.DISCARD),
                   c_x=_O(Action.ADD_HEADER)))
    assert d.reply is None and d.hold == ["a@x"] and d.discard == ["b@x"] and d.deliver == ["c@x"]


def _read(chunks: list[bytes], max_size=10_000):
    async def go():
        r = asyncio.StreamReader()
        for c in chunks:
            r.feed_data(c)
        r.feed_eof()
        inp = Input(r)
        return await inp.read_data(max_size, 5), bytes(inp.buf)
    return asyncio.run(go())


def test_only_crlf_dot_crlf_ends_data():
    (content, size), rest = _read([b"a\n.\nb\r.\rc\r\n.\r\r\nd\r\n", b".\r\nMAIL"])
    assert content == b"a\n.\nb\r.\rc\r\n.\r\r\nd\r\n" and rest == b"MAIL"


def test_end_marker_split_over_reads():
    (content, _), rest = _read([b"x\r", b"\n", b".", b"\r", b"\nQUIT\r\n"])
    assert content == b"x\r\n" and rest == b"QUIT\r\n"


def test_oversized_data_is_discarded_not_buffered():
    (content, size), rest = _read([b"y" * 70000] * 5 + [b"\r\n.\r\nNEXT"], max_size=100_000)
    assert content is None and size > 100_000 and rest == b"NEXT"


def test_unstuff_and_content_checks():
    assert unstuff(b"..a\r\n..\r\nb\r\n") == b".a\r\n.\r\nb\r\n"
    s = Settings()
    assert content_problem(b"a\nb\r\n", s)[1][0] == 550
    s.bare_newlines = "normalize"
    assert content_problem(b"a\nb\rc\r\n", s)[0] == b"a\r\nb\r\nc\r\n"
    s.nul_bytes = "strip"
    assert content_problem(b"a\x00b\r\n", s)[0] == b"ab\r\n"
    assert content_problem(b"x" * 999 + b"\r\n" + b"y\r\n", Settings())[1][0] == 550
    assert content_problem(b"x" * 998 + b"\r\n", Settings())[1] is None
