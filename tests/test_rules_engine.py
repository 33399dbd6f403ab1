"""Body rules: RE2 for the patterns it accepts (linear time), Python's re for the rest, with the
rule's flags honoured by both."""
from __future__ import annotations

import pytest

from conftest import check_json, make_message

RULES = '''
[[rule]]
name = "CASELESS_RE2"
score = 1.0
body = 'limited\\s+time\\s+offer'
flags = "i"

[[rule]]
name = "MULTILINE_RE2"
score = 1.0
body = '^P\\.S\\. act now\\s*$'
flags = "m"

[[rule]]
name = "LOOKBEHIND_FALLS_BACK"
score = 1.0
body = '(?<=discount )code'

[[rule]]
name = "BACKTRACKING_BOMB"
score = 1.0
body = '(a+)+$'

[[rule]]
name = "RAW_NEEDS_CASE"
score = 1.0
rawbody = 'LIMITED'
'''


def test_body_rules_match_on_re2_and_on_re_with_their_flags(tmp_path):
    from filterd import rules

    (tmp_path / "local.toml").write_text(RULES)
    # a text on which Python's re would backtrack for minutes on (a+)+$: RE2 answers at once
    body = ("Hello,\r\n\r\nA LIMITED time   Offer for you.\r\nyour discount code inside\r\n"
            "P.S. act now\r\n" + "a" * 40 + "!\r\n")
    rc, out = check_json(make_message(body), "--set", f"rules.site_dir={tmp_path}")
    hits = {s["name"] for s in out["symbols"]}
    assert {"CASELESS_RE2", "MULTILINE_RE2", "LOOKBEHIND_FALLS_BACK", "RAW_NEEDS_CASE"} <= hits
    assert "BACKTRACKING_BOMB" not in hits
    # which engine each pattern got
    import re

    assert not isinstance(rules._text_scanner(r"a+b", re.I), re.Pattern)
    assert isinstance(rules._text_scanner(r"(?<=x)y", 0), re.Pattern)


# -- body and rawbody patterns in one RE2 set scan -------------------------------------------------
SET_PATTERNS = [  # (pattern, flags): anchors, classes, alternations, flags, non-ASCII
    (r"limited\s+time", "i"), (r"^P\.S\.", "m"), (r"act now\s*$", "m"), (r"a.b", "s"),
    (r"\bfree\b", "i"), (r"\$\d+(?:\.\d\d)?", ""), (r"(?:viagra|cialis)", "i"),
    (r"ünïcödé", "i"), (r"^Hello", ""), (r"inside\r?\n", ""), (r"x{3,}", ""),
    (r"(?<=discount )code", ""),  # RE2 refuses lookbehind: stays outside the set
    (r"never matches anything here", ""), (r"[A-Z]{5,}", ""), (r"\d{4}-\d{4}", ""),
] + [(rf"\bword{i}\b", "i") for i in range(120)]


def _ruleset(key="body"):
    from filterd import rules

    problems = []
    made = [rules._compile_rule({"name": f"R{i}", key: p, "flags": f, "score": 1.0}, "t", i,
                                problems) for i, (p, f) in enumerate(SET_PATTERNS)]
    assert not problems
    return rules.RuleSet(made)


def _view(ruleset, body: str):
    from types import SimpleNamespace

    from filterd import rules
    from filterd.model import Message

    ctx = SimpleNamespace(message=Message(make_message(body)))
    return rules._View(ctx, ruleset.text_sets)


SET_TEXTS = ["A LIMITED   time offer\r\nP.S. act now\r\n",
             "a\nb and axb, FREE for $19.99 or $5, Viagra\r\nWORD7 word77 word119\r\n",
             "ÜNÏCÖDÉ text 1234-5678 xxxx\r\nyour discount code inside\r\n", "", "Hello"]


def test_one_set_scan_finds_what_searching_rule_by_rule_finds():
    import re

    for key in ("body", "rawbody"):
        rs = _ruleset(key)
        ts = rs.text_sets[key]
        # every pattern RE2 accepts is in the set; the lookbehind is searched alone
        assert len(ts.index) == len(SET_PATTERNS) - 1 and "R11" not in ts.index
        for body in SET_TEXTS:
            v = _view(rs, body)
            text = v.text if key == "body" else v.rawbody
            got = {r.name for r in rs.rules if v.found(r, key)}
            want = {r.name for r in rs.rules if r.conds[key].search(text)}
            assert got == want, (key, body)
            # ... and Python's re agrees on these patterns and texts (ASCII \b, \d)
            want_re = {f"R{i}" for i, (p, f) in enumerate(SET_PATTERNS)
                       if re.search(p, text, sum(getattr(re, c.upper()) for c in f))}
            assert got == want_re, (key, body)
        assert {r.name for r in rs.rules if _view(rs, SET_TEXTS[0]).found(r, key)} >= \
            {"R0", "R1", "R2"}


def test_a_failed_set_scan_falls_back_to_searching_rule_by_rule():
    # RE2 gives up on a scan that outgrows its memory budget and then reports no match at all;
    # the always-matching sentinel pattern tells that apart from "no rule matched"
    rs = _ruleset()
    ts = rs.text_sets["body"]
    assert ts.hits("no rule matches this") == {0}

    class OutOfMemory:
        def Match(self, text):
            return None

    class Refuses:
        def scan(self, data):
            return None  # Hyperscan failed on this text: RE2 scans it

    ts.set = OutOfMemory()
    ts.hs = Refuses() if ts.hs is not None else None
    v = _view(rs, SET_TEXTS[0])
    assert ts.hits(v.text) is None
    assert {r.name for r in rs.rules if v.found(r, "body")} == {"R0", "R1", "R2", "R13"}


def test_hyperscan_scans_the_set_and_re2_takes_what_it_cannot():
    pytest.importorskip("hyperscan")
    from filterd import rules

    rs = _ruleset()
    ts = rs.text_sets["body"]
    assert ts.hs is not None  # every pattern of the set compiles under Hyperscan too
    for body in SET_TEXTS:
        v = _view(rs, body)
        assert ts.hs.scan(v.encoded("body")) == ts.hits(v.encoded("body"), False), body

    # a text with undecodable bytes (lone surrogates) is not valid UTF-8: RE2 scans it
    class Trap:
        def scan(self, data):
            raise AssertionError("Hyperscan must not see invalid UTF-8")

    ts.hs = Trap()
    v = _view(rs, "free offer")
    v._texts["body"] = "free \udcff offer"
    assert v.found(rs.by_name["R4"], "body") and "body" in v._invalid

    # a pattern Hyperscan refuses (\C, any byte: RE2 takes it) leaves the whole set to RE2
    assert rules._HyperscanSet.build({1: r"a\Cb"}) is None
    assert rules._HyperscanSet.build({}) is None
