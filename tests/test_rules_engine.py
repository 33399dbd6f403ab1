"""Body rules: RE2 for the patterns it accepts (linear time), Python's re for the rest, with the
rule's flags honoured by both."""
from __future__ import annotations

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
