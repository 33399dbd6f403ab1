"""Released mail is learnt as ham by filterd's Bayes (runs once the bayes module is in the
tree; until then the seam is covered by test_released_mail_is_offered_to_bayes_as_ham)."""
from __future__ import annotations

import pytest
from quarantine_support import Sink, overrides, quarantine_message, spam_message

bayes = pytest.importorskip("filterd.bayes", reason="the Bayes classifier is not in this tree")


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


async def test_release_relearns_message_as_ham(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port))
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(subject="ham really"), "s@spam.example",
                             ["bob@example.org"])
    [e] = await service.qstore.entries_for("bob@example.org")
    b = bayes.Bayes.from_options(pipe.services.store, pipe.config.section("bayes"))
    nspam, nham, _ = await b.tokens.state()
    await service.perform(e, "release")
    nspam2, nham2, _ = await b.tokens.state()
    assert nham2 == nham + 1
    assert nspam2 in (nspam, nspam - 1)  # autolearnt as spam when held: moved to ham


async def test_no_learning_when_switched_off(pipeline_factory, sink):
    pipe = await pipeline_factory(*overrides(sink.port), "quarantine.learn_ham_on_release=false")
    service = pipe.services.extra["quarantine"]
    await quarantine_message(pipe, spam_message(), "s@spam.example", ["bob@example.org"])
    [e] = await service.qstore.entries_for("bob@example.org")
    b = bayes.Bayes.from_options(pipe.services.store, pipe.config.section("bayes"))
    before = await b.tokens.state()
    await service.perform(e, "release")
    assert (await b.tokens.state())[1] == before[1]
