"""The message trace records each message's journey and `filterd track` finds it."""
from __future__ import annotations

import json

from conftest import GTUBE, make_message, run_filterd
from filterd.model import Session


async def test_track_shows_arrival_verdicts_and_later_events(tmp_path, pipeline_factory):
    state = tmp_path / "state"
    pipe = await pipeline_factory()
    session = Session(peer_ip="192.0.2.7", helo="mx.example.com", front_door="smtp")
    ham = await pipe.scan(make_message(subject="quarterly report"), "alice@example.com",
                          ["bob@example.org", "carol@example.org"], session)
    spam = await pipe.scan(make_message(GTUBE), "spammer@example.net", ["bob@example.org"], session)
    await pipe.delivered(ham.ctx, "bob@example.org", "250 2.0.0 Ok: queued as 123")
    await pipe.bounced(ham.ctx, "carol@example.org", "451 4.3.0 try later", permanent=False)
    await pipe.bounced(ham.ctx, "carol@example.org", "550 5.1.1 no such user", permanent=True)
    msg_id = ham.ctx.transaction.id
    assert ("X-Filterd-ID", msg_id) in ham.added_headers
    await pipe.host.pm.get_plugin("trace").flush()  # the messages did not wait for the disk

    base = ["--set", f"server.state_dir={state}", "--json"]
    proc = run_filterd("track", "--from", "alice@example.com", "--since", "1h", *base)
    [found] = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert found["id"] == msg_id
    kinds = [(e["event"], e.get("rcpt")) for e in found["events"]]
    assert kinds == [("arrival", "bob@example.org"), ("arrival", "carol@example.org"),
                     ("delivered", "bob@example.org"), ("deferred", "carol@example.org"),
                     ("bounced", "carol@example.org")]
    arrival = found["events"][0]
    assert arrival["client"] == "192.0.2.7" and arrival["action"] == "accept"
    assert arrival["detail"]["subject"] == "quarterly report"
    assert found["state"] == {"bob@example.org": "delivered", "carol@example.org": "bounced"}

    proc = run_filterd("track", "--to", "bob@example.org", *base)
    ids = [json.loads(line)["id"] for line in proc.stdout.decode().splitlines()]
    assert ids == [msg_id, spam.ctx.transaction.id]
    proc = run_filterd("track", "--id", spam.ctx.transaction.id, *base)
    [s] = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert s["events"][0]["action"] == "reject"
    assert "GTUBE(1000)" in s["events"][0]["detail"]["symbols"]
    # domain search and the human format
    proc = run_filterd("track", "--from", "@example.net", "--set", f"server.state_dir={state}")
    assert b"spammer@example.net" in proc.stdout and b"reject" in proc.stdout
    # the JSON-lines log is written too
    [log] = list((state / "trace").glob("*.jsonl"))
    assert len(log.read_text().splitlines()) == 6


def test_track_without_a_trace_says_so(tmp_path):
    proc = run_filterd("track", "--set", f"server.state_dir={tmp_path}")
    assert proc.returncode == 1 and b"no message trace" in proc.stdout
