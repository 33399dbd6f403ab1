"""The mapping from scan results to milter actions (filterd.milter.actions.plan), on results of
the real pipeline (no MTA needed): per-recipient splits, tempfail precedence, quarantine modes,
header changes addressed by occurrence index."""
from __future__ import annotations

from pathlib import Path

from conftest import GTUBE, make_message

from filterd.milter.actions import plan
from filterd.model import Session
from filterd.verdict import Modification

DATA = Path(__file__).parent / "data" / "milter"


def headers_of(raw: bytes) -> list[tuple[str, str]]:
    block = raw.split(b"\r\n\r\n", 1)[0].decode()
    out = []
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + "\r\n" + line)
        else:
            n, _, v = line.partition(":")
            out.append((n, v))
    return out


async def scan(pipe, raw, rcpts):
    return await pipe.scan(raw, "alice@example.com", rcpts, Session(front_door="milter"))


async def test_all_recipients_rejected_gives_reject_with_filterds_reply(pipeline_factory):
    pipe = await pipeline_factory()
    raw = make_message(body=f"{GTUBE}\r\n")
    p = plan(await scan(pipe, raw, ["a@example.org", "b@example.org"]), headers_of(raw))
    assert p.result == "reject"
    assert p.reply == (550, "5.7.1", "Message rejected as spam (score 1000.0)")
    assert not p.add_headers and not p.delete_rcpts


async def test_rejected_and_discarded_recipients_are_removed_others_delivered(pipeline_factory):
    pipe = await pipeline_factory(f"rules.site_dir={DATA / 'rules'}")
    raw = make_message(body="milter-split-marker\r\n")
    result = await scan(pipe, raw, ["ok@example.org", "strict@example.org", "bin@example.org"])
    p = plan(result, headers_of(raw))
    assert p.result == "continue"
    assert sorted(p.delete_rcpts) == ["bin@example.org", "strict@example.org"]


async def test_any_tempfail_tempfails_the_whole_message(pipeline_factory):
    pipe = await pipeline_factory(f"rules.site_dir={DATA / 'rules'}")
    raw = make_message(body="milter-split-marker\r\n")
    result = await scan(pipe, raw, ["ok@example.org", "strict@example.org"])
    from filterd.verdict import Verdict
    result.outcomes["ok@example.org"].action = Verdict.tempfail().action
    result.outcomes["ok@example.org"].verdict = Verdict.tempfail("scanner down", code=451,
                                                                  enhanced="4.3.0")
    p = plan(result, headers_of(raw))
    assert p.result == "tempfail"
    assert p.reply == (451, "4.3.0", "scanner down")


async def test_quarantine_modes(pipeline_factory):
    pipe = await pipeline_factory(f"rules.site_dir={DATA / 'rules'}")
    raw = make_message(body="milter-hold-marker\r\n")
    result = await scan(pipe, raw, ["bob@example.org"])
    hold = plan(result, headers_of(raw), "hold")
    assert hold.result == "continue" and hold.hold_reason and not hold.store_recipients
    store = plan(result, headers_of(raw), "store")
    assert store.result == "discard" and store.store_recipients == ["bob@example.org"]
    both = plan(result, headers_of(raw), "both")
    assert both.hold_reason and both.store_recipients == ["bob@example.org"]


def test_header_changes_address_occurrences_and_delete_from_the_last():
    class R:  # the fields plan() reads from a ScanResult
        from filterd.pipeline import RecipientOutcome
        from filterd.verdict import Action, Verdict
        outcomes = {"a@x": RecipientOutcome("a@x", Action.ACCEPT, 0.0, Verdict.accept())}
        modifications = [Modification.remove_header("X-Spam-Flag"),
                         Modification.change_header("X-Keep", "new"),
                         Modification.rewrite_subject("[SPAM] {subject}"),
                         Modification.add_header("X-Spam-Flag", "YES"),
                         Modification.add_header("X-Report", "caf\u00e9"),
                         Modification.replace_body(b"new body\r\n")]
    headers = [("Subject", " hello\r\n world"), ("X-Spam-Flag", " forged1"),
               ("X-Keep", " old"), ("X-Spam-Flag", " forged2")]
    p = plan(R, headers)
    assert ("Subject", 1, "[SPAM] hello world") in p.change_headers
    assert ("X-Keep", 1, "new") in p.change_headers
    deletes = [c for c in p.change_headers if c[2] == ""]
    assert deletes == [("X-Spam-Flag", 2, ""), ("X-Spam-Flag", 1, "")]
    assert p.add_headers[0] == ("X-Spam-Flag", "YES")
    assert p.add_headers[1][1].startswith("=?utf-8?")  # non-ASCII is RFC 2047-encoded
    assert p.replace_body == b"new body\r\n"
    assert plan(R, headers, can_replace_body=False).replace_body is None


def test_percent_in_reply_text_is_escaped_for_libmilter():
    from filterd.milter.actions import reply_of
    from filterd.verdict import Verdict
    assert reply_of(Verdict.reject("100% spam"))[2] == "100%% spam"
