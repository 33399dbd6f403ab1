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


def _events(n, start=0):
    from filterd.trace import Event

    return [Event(1_790_000_000.0 + i, f"id{i}", "arrival", "a@example.com", "b@example.org",
                  "192.0.2.1", "accept", 0.5, {"subject": f"s{i}", "symbols": ["X(1)"]})
            for i in range(start, start + n)]


def test_a_busy_index_makes_a_non_waiting_write_give_up_before_writing_anything(tmp_path):
    import sqlite3

    import pytest

    from filterd.trace import IndexBusy, TraceLog

    log = TraceLog(tmp_path, own_checkpoints=True)
    other = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another gateway process is writing
    with pytest.raises(IndexBusy):
        log.record(_events(2), wait=False)
    assert not list(tmp_path.glob("*.jsonl"))
    other.execute("COMMIT")
    log.record(_events(2), wait=False)
    lines = [json.loads(x) for x in next(tmp_path.glob("*.jsonl")).read_text().splitlines()]
    assert [x["detail"] for x in lines] == [{"subject": "s0", "symbols": ["X(1)"]},
                                            {"subject": "s1", "symbols": ["X(1)"]}]
    assert lines[0] == _events(1)[0].to_dict()  # the line is the event as to_dict gives it
    assert [e["id"] for e in log.search(sender="a@example.com")] == ["id0", "id1"]
    # the WAL is not checkpointed behind the owner's back; checkpoint() copies all of it
    busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    log.record(_events(50, 2))
    log.checkpoint()
    busy, frames, copied = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied
    log.close()


async def test_trace_plugin_writes_a_batch_after_another_process_releases_the_index(tmp_path):
    import asyncio
    import sqlite3

    from filterd_plugins.trace import Plugin

    class Services:
        class config:
            state_dir = tmp_path

    plugin = Plugin({"directory": str(tmp_path), "write_delay": "0s"}, Services())
    plugin._log()
    other = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another gateway process is writing
    await plugin.record(_events(3))
    flushed = asyncio.ensure_future(plugin.flush())
    await asyncio.sleep(0.2)
    # the event loop still runs while the batch waits for the lock (a writer that waited in
    # the loop would never let this line run, and its batch would fail after the timeout)
    other.execute("COMMIT")
    await asyncio.wait_for(flushed, 20)
    assert [e["id"] for e in plugin.log.search(sender="a@example.com")] == ["id0", "id1", "id2"]
    await plugin.shutdown()


def test_events_in_one_second_and_across_days_get_their_own_time_and_day_file(tmp_path):
    """The JSON log's time and day file come from a per-second memo: events of one second
    share it, and the next second (or day) must not inherit it."""
    import time

    from filterd.trace import Event, TraceLog

    log = TraceLog(tmp_path)
    midnight = 1795046400.0  # 2026-11-19T00:00:00Z
    stamps = [midnight - 1.5, midnight - 0.25, midnight, midnight + 0.999, midnight + 61]
    log.record([Event(ts, f"id{i}", "arrival", "a@example.com", "b@example.org")
                for i, ts in enumerate(stamps)])
    lines = [json.loads(line) for f in sorted(tmp_path.glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    assert sorted(f.name for f in tmp_path.glob("*.jsonl")) == ["2026-11-18.jsonl",
                                                                 "2026-11-19.jsonl"]
    assert [d["time"] for d in lines] == [
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) for ts in stamps]
    log.close()


def test_transaction_ids_grow_never_repeat_and_differ_between_worker_processes():
    """The trace index appends ids rather than scattering them (see transaction_id), and the
    workers a gateway forks never hand out the same id."""
    import itertools
    import os

    from filterd.model import Transaction, transaction_id

    ids = [transaction_id() for _ in range(5000)] + [Transaction(Session()).id]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    # ordered by the second they were made; within a second, by the counter (which may wrap
    # once in a process's life, at most one step back)
    assert sum(a > b for a, b in itertools.pairwise(ids)) <= 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked worker
        os.write(w, " ".join(transaction_id() for _ in range(2000)).encode())
        os._exit(0)
    os.close(w)
    child = b""
    while chunk := os.read(r, 65536):
        child += chunk
    os.waitpid(pid, 0)
    os.close(r)
    theirs = child.decode().split()
    assert len(theirs) == 2000
    assert not set(theirs) & set(ids + [transaction_id() for _ in range(2000)])
    assert {i[8:11] for i in theirs} == {f"{pid & 0xFFF:03x}"}  # each process its own tag
    assert {i[8:11] for i in ids} == {f"{os.getpid() & 0xFFF:03x}"}
