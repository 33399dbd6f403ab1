"""`filterd check` end to end: the command a mail admin runs on a message file."""
from __future__ import annotations

import pytest

from conftest import CORPUS, GTUBE, check_json, make_message, run_filterd


def test_gtube_is_rejected_with_its_symbol():
    rc, out = check_json(make_message(f"Test\r\n{GTUBE}\r\n"), "--rcpt", "bob@example.org")
    names = [s["name"] for s in out["symbols"]]
    assert "GTUBE" in names
    assert out["action"] == "reject"
    assert out["recipients"] == {"bob@example.org": "reject"}
    assert out["score"] >= 15
    assert rc == 8


@pytest.mark.skipif(not CORPUS.exists(), reason="SpamAssassin corpus not present")
def test_plain_ham_from_the_corpus_gets_no_action():
    ham = sorted((CORPUS / "easy_ham").iterdir())[:20]
    for f in ham:
        rc, out = check_json(f, "--rcpt", "user@example.org", "--from", "sender@example.net")
        assert out["action"] == "accept", (f.name, out["symbols"])
        assert out["recipients"]["user@example.org"] == "accept"
        assert rc == 0


def test_json_output_has_the_documented_keys():
    rc, out = check_json(make_message(), "--rcpt", "a@example.org", "--rcpt", "b@example.org")
    for key in ("action", "score", "symbols", "recipients", "headers"):
        assert key in out
    assert set(out["recipients"]) == {"a@example.org", "b@example.org"}
    assert isinstance(out["headers"], list)


def test_tagged_message_shows_the_headers_that_would_be_added():
    # a site threshold of 0.5 makes the missing-headers symbols enough to tag the message
    msg = b"Subject: FREE MONEY NOW!!!!\r\n\r\nact now, limited time offer\r\n"
    rc, out = check_json(msg, "--rcpt", "a@example.org", "--set", "actions.add_header=0.5")
    assert out["action"] == "add_header"
    names = [h["name"] for h in out["headers"]]
    assert "X-Spam-Flag" in names and "X-Spam-Status" in names
    assert rc == 3


def test_human_output_names_symbols_and_recipients():
    proc = run_filterd("check", "--rcpt", "a@example.org", "-",
                       input=make_message(f"{GTUBE}\r\n"))
    text = proc.stdout.decode()
    assert "GTUBE" in text and "<a@example.org>: reject" in text
    assert proc.returncode == 8


def test_unreadable_file_gives_a_clear_error():
    proc = run_filterd("check", "/nonexistent/message.eml")
    assert proc.returncode == 1
    assert b"cannot read /nonexistent/message.eml" in proc.stderr
