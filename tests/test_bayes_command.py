"""`filterd bayes` end to end with --db: train from a directory, an mbox and a Maildir; stats;
classify (text and --json, one object per line); learn for scripts."""
from __future__ import annotations

import json

from conftest import run_filterd

from bayes_helpers import synth


def write_corpus(tmp_path):
    spam_dir = tmp_path / "spam"
    spam_dir.mkdir()
    for i in range(15):
        (spam_dir / f"{i:03d}.eml").write_bytes(b"From spammer@x Fri Nov 27 08:00:00 2026\n"
                                                + synth("spam", i))
    mbox = tmp_path / "ham.mbox"
    with open(mbox, "wb") as f:
        for i in range(10):
            f.write(b"From colleague@work.example Fri Nov 27 08:00:00 2026\n")
            f.write(synth("ham", i).replace(b"\r\n", b"\n") + b"\n")
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for i in range(10, 16):
        (maildir / ("cur" if i % 2 else "new") / f"{i}.host:2,S").write_bytes(synth("ham", i))
    return spam_dir, mbox, maildir


def test_train_stats_classify_learn(tmp_path):
    spam_dir, mbox, maildir = write_corpus(tmp_path)
    db = str(tmp_path / "tokens.sqlite")
    p = run_filterd("bayes", "train", "--db", db, "--spam", str(spam_dir), "--ham", str(mbox),
                    "--ham", str(maildir), "--progress", "always", check=True)
    out = p.stdout.decode()
    assert "spam: " in out and "15 learned" in out
    assert "10 learned" in out and "6 learned" in out
    assert "15/15 100%" in p.stderr.decode()  # the progress bar
    st = json.loads(run_filterd("bayes", "stats", "--db", db, "--json", check=True).stdout)
    assert st["spam_messages"] == 15 and st["ham_messages"] == 16 and st["tokens"] > 50
    # the presence filter holds the tokens: a few hundred of its 8 million bits
    assert 0 < st["presence_filter_fill"] < 0.001
    assert 0 < st["presence_filter_false_positive_rate"] < 1e-9
    text = run_filterd("bayes", "stats", "--db", db, check=True).stdout.decode()
    assert "never-learned tokens is looked up anyway" in text
    # the linear model: trained once over all 31 messages, ham and spam together; Fisher's
    # method, from the other folds' counts, gets every message of this easy corpus right,
    # so the model had nothing to correct
    assert "linear model: 31 messages, 5 passes" in out
    assert "trained on 31 messages, mixed into the probability" in text
    lin = st["linear_model"]
    assert lin["enabled"] and lin["used"] and lin["messages"] == 31 and lin["buckets_set"] == 0

    test_spam, test_ham = tmp_path / "t-spam.eml", tmp_path / "t-ham.eml"
    test_spam.write_bytes(synth("spam", 77, seed=5))
    test_ham.write_bytes(synth("ham", 77, seed=5))
    p = run_filterd("bayes", "classify", "--db", db, "--json", str(test_spam), str(test_ham),
                    check=True)
    lines = [json.loads(x) for x in p.stdout.decode().splitlines()]
    assert [x["file"] for x in lines] == [str(test_spam), str(test_ham)]
    assert lines[0]["probability"] > 0.9 and lines[1]["probability"] < 0.1
    text = run_filterd("bayes", "classify", "--db", db, str(test_spam), check=True).stdout.decode()
    assert text.startswith(str(test_spam)) and "BAYES_SPAM" in text

    # learn for scripts: once, then "already", then moved to the other class
    p = run_filterd("bayes", "learn", "--db", db, "--ham", str(test_spam), check=True)
    assert "learned as ham" in p.stdout.decode()
    p = run_filterd("bayes", "learn", "--db", db, "--ham", "-", input=test_spam.read_bytes(),
                    check=True)
    assert "already as ham" in p.stdout.decode()
    p = run_filterd("bayes", "learn", "--db", db, "--spam", str(test_spam), check=True)
    assert "relearned as spam" in p.stdout.decode()
    st = json.loads(run_filterd("bayes", "stats", "--db", db, "--json", check=True).stdout)
    assert (st["spam_messages"], st["ham_messages"]) == (16, 16)


def test_missing_path_is_a_clear_error(tmp_path):
    p = run_filterd("bayes", "train", "--db", str(tmp_path / "x.sqlite"), "--spam",
                    str(tmp_path / "nope"))
    assert p.returncode == 1
    assert "nope: no such file or directory" in p.stderr.decode()
    p = run_filterd("bayes", "classify", "--db", str(tmp_path / "x.sqlite"), str(tmp_path / "nope"))
    assert p.returncode == 1 and "cannot read" in p.stderr.decode()


def test_stats_and_classify_say_when_the_database_needs_retraining(tmp_path):
    import asyncio

    from filterd.bayes.store import FORMAT_FIELD
    from filterd.store.sqlite import SQLiteStore

    spam_dir, mbox, maildir = write_corpus(tmp_path)
    db = str(tmp_path / "tokens.sqlite")
    run_filterd("bayes", "train", "--db", db, "--spam", str(spam_dir), "--ham", str(mbox),
                check=True)
    st = json.loads(run_filterd("bayes", "stats", "--db", db, "--json", check=True).stdout)
    assert st["messages_learned_with_older_format"] == 0
    assert "(current)" in run_filterd("bayes", "stats", "--db", db, check=True).stdout.decode()

    async def make_old():  # as a database from before the token-format marker looks
        store = SQLiteStore(db)
        await store.mhincr({"bayes:meta": {FORMAT_FIELD: -25}})
        await store.close()

    asyncio.run(make_old())
    out = run_filterd("bayes", "stats", "--db", db, check=True).stdout.decode()
    assert "OUTDATED: 25 of the 25 messages" in out and "train --reset" in out
    probe = tmp_path / "probe.eml"
    probe.write_bytes(synth("spam", 3, seed=9))
    p = run_filterd("bayes", "classify", "--db", db, str(probe), check=True)
    assert "older tokenizer" in p.stderr.decode()

    p = run_filterd("bayes", "train", "--db", db, "--reset", "--spam", str(spam_dir),
                    "--ham", str(mbox), check=True)
    assert "emptied (15 spam, 10 ham were learned)" in p.stdout.decode()
    assert "older tokenizer" not in p.stderr.decode()
    st = json.loads(run_filterd("bayes", "stats", "--db", db, "--json", check=True).stdout)
    assert st["messages_learned_with_older_format"] == 0 and st["spam_messages"] == 15
