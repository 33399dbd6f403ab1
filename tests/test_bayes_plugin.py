"""The bayes plugin in the real pipeline: symbols from a trained classifier, training by e-mail
end to end (learn addresses, authentication, attached or redirected originals, consumed
messages), and autolearn after delivery (never for mail rejected at SMTP time)."""
from __future__ import annotations

from email.message import EmailMessage

from filterd.bayes import Bayes
from filterd.model import Session
from filterd.verdict import Action

from bayes_helpers import synth

LEARN = ["bayes.learn_spam_addresses=['spam@gw.example']",
         "bayes.learn_ham_addresses=['ham@gw.example']",
         "bayes.min_spam=5", "bayes.min_ham=5"]


async def trained_pipeline(pipeline_factory, *extra):
    pipe = await pipeline_factory(*LEARN, *extra)
    bayes = Bayes(pipe.services.store)
    await bayes.learn([synth("spam", i) for i in range(20)], spam=True)
    await bayes.learn([synth("ham", i) for i in range(20)], spam=False)
    return pipe, bayes


def forward_as_attachment(original: bytes, sender="alice@example.org", to="spam@gw.example"):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = "Fwd: this is spam"
    m.set_content("Please learn the attached message.")
    from email import message_from_bytes, policy

    m.add_attachment(message_from_bytes(original, policy=policy.compat32))
    return m.as_bytes()


async def transaction(pipe, raw, rcpts, auth_user="", ip="192.0.2.10"):
    session = Session(peer_ip=ip, auth_user=auth_user, front_door="smtp")
    ctx = pipe.begin(session)
    await pipe.mail_from(ctx, "alice@example.org", {})
    replies = {r: await pipe.rcpt_to(ctx, r, {}) for r in rcpts}
    accepted = [r for r, v in replies.items() if v.action not in (Action.REJECT, Action.TEMPFAIL)]
    result = await pipe.data(ctx, raw) if accepted else None
    return ctx, replies, result


async def test_trained_classifier_reports_graded_symbols(pipeline_factory):
    pipe, _ = await trained_pipeline(pipeline_factory)
    spam = await pipe.scan(synth("spam", 500, seed=3), "x@deals.example", ["bob@example.org"])
    ham = await pipe.scan(synth("ham", 500, seed=3), "colleague@work.example", ["bob@example.org"])
    spam_syms = {s.name: s for s in spam.symbols}
    ham_syms = {s.name: s for s in ham.symbols}
    assert "BAYES_SPAM_HIGH" in spam_syms and spam_syms["BAYES_SPAM_HIGH"].score == 5.0
    assert "BAYES_HAM_HIGH" in ham_syms and ham_syms["BAYES_HAM_HIGH"].score == -2.0
    assert float(spam_syms["BAYES_SPAM_HIGH"].options[0]) > 0.99


async def test_untrained_classifier_stays_silent(pipeline_factory):
    pipe = await pipeline_factory()
    res = await pipe.scan(synth("spam", 1), "", ["bob@example.org"])
    names = {s.name for s in res.symbols}
    assert "BAYES_NOT_TRAINED" in names
    assert not names & {"BAYES_SPAM", "BAYES_SPAM_HIGH", "BAYES_HAM", "BAYES_HAM_HIGH"}


async def test_forwarded_spam_to_learn_address_is_learned_and_consumed(pipeline_factory):
    pipe, bayes = await trained_pipeline(pipeline_factory)
    # a spam the filter has never seen, with words it does not know yet
    original = synth("spam", 900).replace(b"Subject: ", b"Subject: zorblax quuxified ")
    before = await bayes.tokens.counts({"subj:zorblax"})
    assert before == {}
    ctx, replies, result = await transaction(
        pipe, forward_as_attachment(original), ["spam@gw.example", "carol@example.org"],
        auth_user="alice")
    assert replies["spam@gw.example"].action is Action.ACCEPT
    # the learn address consumes its copy; the other recipient is handled as usual
    assert result.outcomes["spam@gw.example"].action is Action.DISCARD
    assert "learned as spam" in result.outcomes["spam@gw.example"].verdict.reason
    assert result.outcomes["carol@example.org"].action.delivers
    assert await bayes.tokens.totals() == (21, 20)
    counts = await bayes.tokens.counts({"subj:zorblax", "subj:fwd"})
    assert counts == {"subj:zorblax": (1, 0)}  # the original, not the forwarding wrapper
    # sending it again does not count twice
    _, _, again = await transaction(pipe, forward_as_attachment(original), ["spam@gw.example"],
                                    auth_user="alice")
    assert "already" in again.outcomes["spam@gw.example"].verdict.reason
    assert await bayes.tokens.totals() == (21, 20)


async def test_redirected_ham_is_learned_and_moves_a_wrongly_learned_message(pipeline_factory):
    pipe, bayes = await trained_pipeline(pipeline_factory)
    original = synth("ham", 901)
    await bayes.learn([original], spam=True)  # a mistake, to be corrected by the user
    assert await bayes.tokens.totals() == (21, 20)
    redirected = (b"Resent-From: alice@example.org\r\nResent-To: ham@gw.example\r\n"
                  b"Resent-Date: Fri, 27 Nov 2026 09:00:00 +0000\r\n" + original)
    _, _, result = await transaction(pipe, redirected, ["ham@gw.example"], ip="198.51.100.7",
                                     auth_user="alice")
    out = result.outcomes["ham@gw.example"]
    assert out.action is Action.DISCARD and "relearned" in out.verdict.reason
    assert await bayes.tokens.totals() == (20, 21)
    assert (await bayes.tokens.counts({"from:dom:work.example"}))[
        "from:dom:work.example"] == (0, 21)


async def test_learn_address_refuses_unauthenticated_senders(pipeline_factory):
    pipe, bayes = await trained_pipeline(pipeline_factory)
    _, replies, result = await transaction(pipe, forward_as_attachment(synth("spam", 902)),
                                           ["spam@gw.example"], auth_user="", ip="203.0.113.5")
    v = replies["spam@gw.example"]
    assert v.action is Action.REJECT and v.smtp_reply()[0] == 550
    assert result is None
    assert await bayes.tokens.totals() == (20, 20)


async def test_learn_networks_admit_local_clients(pipeline_factory):
    pipe, bayes = await trained_pipeline(pipeline_factory, "bayes.learn_networks=['10.0.0.0/8']")
    _, replies, result = await transaction(pipe, forward_as_attachment(synth("spam", 903)),
                                           ["spam@gw.example"], ip="10.1.2.3")
    assert replies["spam@gw.example"].action is Action.ACCEPT
    assert result.outcomes["spam@gw.example"].action is Action.DISCARD
    assert await bayes.tokens.totals() == (21, 20)


async def test_autolearn_after_delivery_and_never_for_rejected_mail(pipeline_factory):
    from conftest import GTUBE

    pipe, bayes = await trained_pipeline(pipeline_factory, "bayes.autolearn_spam_score=10",
                                         "actions.reject=2000")
    # confident spam (GTUBE scores 1000 without Bayes), quarantined/tagged: learned as spam
    raw = synth("spam", 950).replace(b"\r\n\r\n", b"\r\n\r\n" + GTUBE.encode() + b"\r\n", 1)
    ctx, _, result = await transaction(pipe, raw, ["bob@example.org"])
    assert result.outcomes["bob@example.org"].action is Action.QUARANTINE
    await pipe.quarantined(ctx, "bob@example.org", "spam")
    assert ctx.data["bayes_autolearned"] == "spam:learned"
    assert (await bayes.tokens.totals())[0] == 21
    # confident ham, delivered: learned as ham
    ctx, _, result = await transaction(pipe, synth("ham", 951), ["bob@example.org"])
    await pipe.delivered(ctx, "bob@example.org", "250 ok")
    assert ctx.data["bayes_autolearned"] == "ham:learned"
    assert await bayes.tokens.totals() == (21, 21)
    # rejected at SMTP time: never learned, even if a front door reported an event
    pipe2, bayes2 = await trained_pipeline(pipeline_factory, "actions.reject=15")
    before = await bayes2.tokens.totals()  # (the same state directory: same database)
    ctx, _, result = await transaction(pipe2, raw.replace(b"950", b"952"), ["bob@example.org"])
    assert result.outcomes["bob@example.org"].action is Action.REJECT
    await pipe2.delivered(ctx, "bob@example.org", "250 ok")
    assert ctx.data.get("bayes_autolearned") is None
    assert await bayes2.tokens.totals() == before


async def test_learn_message_is_deferred_when_the_token_store_is_down(pipeline_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    # (the default redis_down mode falls back to this node's SQLite file and learns there)
    pipe = await pipeline_factory(*LEARN, "store.backend=redis",
                                  f"store.url=redis://127.0.0.1:{port}/0",
                                  "store.redis_down.mode=skip")
    _, replies, result = await transaction(pipe, forward_as_attachment(synth("spam", 904)),
                                           ["spam@gw.example"], auth_user="alice")
    assert replies["spam@gw.example"].action is Action.ACCEPT
    out = result.outcomes["spam@gw.example"]
    assert out.action is Action.TEMPFAIL and out.verdict.smtp_reply()[0] == 451
    assert any(s.name == "PLUGIN_ERROR" for s in result.symbols)


async def test_token_counts_are_read_once_a_second_and_afresh_after_learning(pipeline_factory,
                                                                           monkeypatch):
    import filterd_plugins.bayes as bayes_plugin

    pipe = await pipeline_factory(*LEARN)
    plugin = pipe.host.pm.get_plugin("bayes")
    now = [1000.0]
    monkeypatch.setattr(bayes_plugin.time, "monotonic", lambda: now[0])
    ham = synth("ham", 1)
    first = await pipe.scan(ham, "x@example.net", ["bob@example.org"])
    assert "BAYES_NOT_TRAINED" in {s.name for s in first.symbols}
    # another process trains the database: within STATE_TTL the counts read before still hold
    bayes = Bayes(pipe.services.store)
    await bayes.learn([synth("spam", i) for i in range(20)], spam=True)
    await bayes.learn([synth("ham", i) for i in range(20)], spam=False)
    again = await pipe.scan(ham, "x@example.net", ["bob@example.org"])
    assert "BAYES_NOT_TRAINED" in {s.name for s in again.symbols}
    now[0] += bayes_plugin.STATE_TTL + 0.1
    later = await pipe.scan(ham, "x@example.net", ["bob@example.org"])
    assert {"BAYES_HAM", "BAYES_HAM_HIGH"} & {s.name for s in later.symbols}
    # learning by e-mail through the plugin forgets the counts it read
    counts = plugin._state
    ctx, _, _ = await transaction(pipe, forward_as_attachment(synth("spam", 77)),
                                  ["spam@gw.example"], auth_user="alice")
    assert plugin._state is None or plugin._state != counts
