"""Aliases and distribution lists expand recipients before content policy, so each final
recipient gets its own outcome; loops and oversize expansions are caught."""
from __future__ import annotations

import textwrap

import pytest

from conftest import check_json, make_message
from filterd.aliases import AliasError, AliasMap, parse_postfix_aliases


def test_postfix_alias_syntax_with_continuations_include_and_refused_commands(tmp_path):
    inc = tmp_path / "team.txt"
    inc.write_text("dev1@example.org\n# comment\ndev2@example.org\n")
    entries = parse_postfix_aliases(textwrap.dedent(f"""
        # comment
        postmaster: root
        root: ann@example.org,
            bob@example.org
        team: :include:{inc}
        pipe: "|/usr/bin/evil", ann@example.org
    """))
    assert entries == {"postmaster": ["root"], "root": ["ann@example.org", "bob@example.org"],
                       "team": ["dev1@example.org", "dev2@example.org"],
                       "pipe": ["ann@example.org"]}
    with pytest.raises(AliasError, match=r"<aliases>:2: expected 'name: target"):
        parse_postfix_aliases("ok: a\nno colon here\n")


def test_recursive_expansion_dedupes_and_keeps_self_delivery():
    m = AliasMap({"all@x.org": ["sales@x.org", "dev@x.org", "ann@x.org"],
                  "sales@x.org": ["ann@x.org", "bob@x.org"], "dev@x.org": ["bob@x.org", "cid"],
                  "keep@x.org": ["keep@x.org", "archive@x.org"]})
    assert m.expand("all@x.org").recipients == ["ann@x.org", "bob@x.org", "cid@x.org"]
    assert m.expand("keep@x.org").recipients == ["keep@x.org", "archive@x.org"]
    assert m.expand("nobody@x.org").recipients == ["nobody@x.org"]


def test_alias_loops_are_broken_and_reported():
    m = AliasMap({"a@x.org": ["b@x.org"], "b@x.org": ["c@x.org", "a@x.org"],
                  "c@x.org": ["real@x.org"]})
    exp = m.expand("a@x.org")
    assert exp.recipients == ["real@x.org"]
    assert exp.loops == ["a@x.org -> b@x.org -> a@x.org"]


def test_depth_and_size_limits():
    chain = {f"l{i}@x.org": [f"l{i + 1}@x.org"] for i in range(20)}
    assert AliasMap(chain, max_depth=5).expand("l0@x.org").too_deep
    big = AliasMap({"big@x.org": [f"u{i}@x.org" for i in range(50)]}, max_recipients=10)
    exp = big.expand("big@x.org")
    assert exp.truncated and len(exp.recipients) == 10


def test_plus_addressing_and_catch_all():
    m = AliasMap({"sales@x.org": ["ann@x.org"]}, catch_all={"v.org": "inbox@v.org"})
    assert m.expand("sales+news@x.org").recipients == ["ann@x.org"]
    assert m.expand("anything@v.org").recipients == ["inbox@v.org"]
    assert AliasMap({"sales@x.org": ["ann@x.org"]}, plus_separator="").expand(
        "sales+news@x.org").recipients == ["sales+news@x.org"]


def test_each_expanded_recipient_gets_its_own_outcome(tmp_path):
    aliases = tmp_path / "aliases"
    aliases.write_text("team: ann, ceo\n")
    rc, out = check_json(make_message("act now, limited time offer! risk-free",
                                      subject="MAKE MONEY FAST TODAY!!!"),
                         "--rcpt", "team@example.org", "--from", "x@example.net",
                         "--set", f"aliases.file={aliases}",
                         "--set", 'actions.recipients."ceo@example.org".quarantine=1.0')
    assert out["recipients"] == {"ann@example.org": "accept", "ceo@example.org": "quarantine"}


def test_virtual_domains_reject_unknown_addresses_and_members_only_lists(tmp_path):
    members = tmp_path / "staff.txt"
    members.write_text("ann@example.org\nbob@example.org\n")
    base = ["--set", "aliases.virtual_domains=['example.org']",
            "--set", 'aliases.map."info@example.org"=["ann@example.org"]',
            "--set", f'aliases.lists."staff@example.org".members_file="{members}"',
            "--set", 'aliases.lists."staff@example.org".members_only=true']
    rc, out = check_json(make_message(), "--rcpt", "info@example.org", "--rcpt",
                         "ghost@example.org", "--from", "x@example.net", *base)
    assert out["recipients"]["ann@example.org"] == "accept"
    assert out["recipients"]["ghost@example.org"] == "reject"
    assert out["recipient_details"]["ghost@example.org"]["code"] == 550
    # a non-member may not post to the members-only list
    rc, out = check_json(make_message(), "--rcpt", "staff@example.org", "--from",
                         "x@example.net", *base)
    assert out["recipients"] == {"staff@example.org": "reject"}
    assert "Only members" in out["recipient_details"]["staff@example.org"]["reason"]
    # a member may, and the list expands with duplicates removed
    rc, out = check_json(make_message(), "--rcpt", "staff@example.org", "--rcpt",
                         "info@example.org", "--from", "bob@example.org", *base)
    assert sorted(out["recipients"]) == ["ann@example.org", "bob@example.org"]


def test_a_missing_alias_file_stops_start_up_with_its_name(tmp_path):
    from conftest import run_filterd

    proc = run_filterd("check", "--set", f"aliases.file={tmp_path}/nope", "-",
                       input=make_message())
    assert proc.returncode == 1
    assert f"[aliases] file {tmp_path}/nope: No such file or directory".encode() in proc.stderr
