"""Outcomes are per recipient: two recipients of one message can get two different actions."""
from __future__ import annotations

from conftest import check_json, make_message
from filterd.verdict import Action, Verdict

SPAMMY = make_message("act now, limited time offer! 100% guaranteed, risk-free.\r\n",
                      subject="MAKE MONEY FAST TODAY!!!")


def test_per_recipient_thresholds_give_two_recipients_two_actions():
    rc, out = check_json(SPAMMY, "--rcpt", "ceo@example.org", "--rcpt", "dev@example.org",
                         "--set", 'actions.recipients."ceo@example.org".quarantine=2.0')
    assert out["score"] >= 2.0
    assert out["recipients"] == {"ceo@example.org": "quarantine", "dev@example.org": "accept"}
    assert out["action"] == "quarantine"
    assert rc == 5


def test_per_domain_thresholds_apply_to_subdomains_and_recipient_overrides_win(tmp_path):
    rc, out = check_json(SPAMMY, "--rcpt", "a@sales.example.org", "--rcpt", "b@example.org",
                         "--rcpt", "vip@sales.example.org", "--rcpt", "x@other.test",
                         "--set", 'actions.domains."example.org".add_header=1.0',
                         "--set", 'actions.recipients."vip@sales.example.org".add_header=50.0')
    assert out["recipients"] == {"a@sales.example.org": "add_header", "b@example.org": "add_header",
                                 "vip@sales.example.org": "accept", "x@other.test": "accept"}


def test_a_recipient_rule_scores_only_for_its_recipient(tmp_path):
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "local.toml").write_text('''
[[rule]]
name = "TO_TRAP"
description = "Sent to the spam trap"
score = 20.0
recipient = '^trap@'
''')
    rc, out = check_json(make_message(), "--rcpt", "trap@example.org", "--rcpt", "bob@example.org",
                         "--set", f"rules.site_dir={rules}")
    assert out["recipients"] == {"trap@example.org": "reject", "bob@example.org": "accept"}
    assert out["recipient_details"]["trap@example.org"]["score"] == 20.0
    assert out["score"] == 0.0  # the message-level score does not include it


async def test_plugin_verdicts_per_recipient_and_decide_overrides(tmp_path, pipeline_factory):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "policy.py").write_text('''
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict

@hookimpl
def rcpt_to(recipient):
    if recipient.local_part == "gone":
        return Verdict.reject("No such user here", code=550, enhanced="5.1.1")

@hookimpl
def data(ctx):
    ctx.set_verdict(Verdict.quarantine("held for review"), recipient="held@example.org")
    ctx.add_symbol("BIG", 100.0)

@hookimpl
def decide(ctx):
    return {"postmaster@example.org": Verdict.accept("postmaster gets everything")}
''')
    pipe = await pipeline_factory(f"plugins.site_dir={tmp_path / 'p'}")
    res = await pipe.scan(make_message(), "a@example.com",
                          ["held@example.org", "postmaster@example.org", "other@example.org",
                           "gone@example.org"])
    actions = {a: o.action for a, o in res.outcomes.items()}
    assert actions == {"held@example.org": Action.REJECT,  # score 100 beats quarantine
                       "postmaster@example.org": Action.ACCEPT,
                       "other@example.org": Action.REJECT,
                       "gone@example.org": Action.REJECT}
    assert res.outcomes["gone@example.org"].verdict.smtp_reply() == (
        550, "5.1.1", "No such user here")
    assert res.outcomes["postmaster@example.org"].verdict.reason == "postmaster gets everything"


def test_verdict_severity_and_smtp_replies():
    assert Verdict.reject().worse(Verdict.quarantine()).action is Action.REJECT
    assert Verdict.quarantine().worse(Verdict.reject()).action is Action.REJECT
    assert Verdict.tempfail("busy").smtp_reply() == (451, "4.7.1", "busy")
    # an enhanced code of the wrong class is corrected to match the basic code
    assert Verdict.reject("x", code=450, enhanced="5.7.1").smtp_reply()[1] == "4.7.1"
    assert Verdict.reject("a\r\nb").smtp_reply()[2] == "a  b"
