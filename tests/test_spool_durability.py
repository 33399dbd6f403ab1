"""The durable spool: write-temp → fsync → rename → fsync dir before enqueue returns, group
commit, recovery, corrupt/hold areas, locking across processes."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from filterd.queue import Envelope, Locked, Spool, SpoolError
from filterd.queue import spool as spool_mod

MSG = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: t\r\n\r\nbody\r\n.leading dot\r\n"


async def test_enqueue_writes_envelope_and_exact_data(tmp_path):
    sp = Spool(tmp_path / "spool")
    env = Envelope("a@example.com", ["b@example.org", "c@example.org"],
                   meta={"client_ip": "192.0.2.1"}, mail_params={"BODY": "8BITMIME"},
                   rcpt_params={"b@example.org": {"NOTIFY": "FAILURE"}})
    qid = await sp.enqueue(env, MSG)
    assert qid and env.queue_id == qid
    assert sp.ids("active") == [qid]
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    with sp.open(qid) as h:
        assert h.read_data() == MSG
        assert h.envelope.recipients == ["b@example.org", "c@example.org"]
        assert h.envelope.meta == {"client_ip": "192.0.2.1"}
        assert h.envelope.rcpt_params["b@example.org"] == {"NOTIFY": "FAILURE"}
        assert h.envelope.received_at > 0
    sp.close()


async def test_enqueue_fsyncs_file_then_renames_then_fsyncs_directory(tmp_path, monkeypatch):
    sp = Spool(tmp_path / "spool")
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(b)))
        return real_rename(a, b)

    monkeypatch.setattr(spool_mod.os, "fsync", fsync)
    monkeypatch.setattr(spool_mod.os, "rename", rename)
    qid = await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), MSG)
    active = str(tmp_path / "spool" / "active")
    kinds = [(k, p.rsplit("/", 2)[-2] if k == "fsync" and p.endswith(qid) else p) for k, p in events]
    # file fsync'd (while still in tmp/), renamed into active/, then active/ fsync'd
    assert events[0][0] == "fsync" and events[0][1].endswith(f"/tmp/{qid}"), kinds
    assert events[1] == ("rename", f"{active}/{qid}")
    assert events[2] == ("fsync", active)
    sp.close()


async def test_concurrent_enqueues_share_group_commits(tmp_path):
    sp = Spool(tmp_path / "spool")
    ids = await asyncio.gather(*(sp.enqueue(Envelope("a@x.org", [f"r{i}@y.org"]), MSG)
                                 for i in range(200)))
    assert len(set(ids)) == 200
    assert sorted(ids) == sp.ids("active")
    assert sp.commits < 200 / 4  # batched: far fewer directory syncs than messages
    sp.close()


async def test_enqueue_error_is_reported_and_nothing_half_stored(tmp_path):
    sp = Spool(tmp_path / "spool")
    os.chmod(tmp_path / "spool" / "active", 0o500)
    try:
        if os.geteuid() == 0:  # root ignores permissions: break the directory instead
            os.chmod(tmp_path / "spool" / "active", 0o700)
            os.rename(tmp_path / "spool" / "active", tmp_path / "spool" / "gone")
        with pytest.raises(SpoolError, match="cannot write message to spool"):
            await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), MSG)
        assert os.listdir(tmp_path / "spool" / "tmp") == []
    finally:
        if (tmp_path / "spool" / "active").exists():
            os.chmod(tmp_path / "spool" / "active", 0o700)
    sp.close()


async def test_enqueue_refuses_an_envelope_without_recipients(tmp_path):
    sp = Spool(tmp_path / "spool")
    with pytest.raises(SpoolError, match="no recipients"):
        await sp.enqueue(Envelope("a@x.org", []), MSG)
    sp.close()


async def test_hold_envelope_goes_to_the_hold_area(tmp_path):
    sp = Spool(tmp_path / "spool")
    qid = await sp.enqueue(Envelope("a@x.org", ["b@y.org"], hold=True), MSG)
    assert sp.ids("hold") == [qid] and sp.ids("active") == []
    assert sp.recover() == []  # held messages are not scheduled for delivery
    sp.close()


async def test_recovery_keeps_good_messages_moves_corrupt_and_cleans_tmp(tmp_path):
    sp = Spool(tmp_path / "spool")
    good = await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), MSG)
    deferred = await sp.enqueue(Envelope("a@x.org", ["c@y.org"]), MSG)
    with sp.open(deferred) as h:
        h.state.next_attempt = 4102444800.0
        h.state.rcpt("c@y.org").attempts = 1
        h.save_state()
    trunc = await sp.enqueue(Envelope("a@x.org", ["d@y.org"]), MSG)
    p = tmp_path / "spool" / "active" / trunc
    p.write_bytes(p.read_bytes()[:-5])  # torn data
    (tmp_path / "spool" / "active" / "JUNK1").write_bytes(b"not a spool file")
    (tmp_path / "spool" / "active" / "GONE1.state").write_text("{}")  # orphan state
    stale = tmp_path / "spool" / "tmp" / "stale"
    stale.write_bytes(b"half")
    os.utime(stale, (1, 1))
    sp.close()

    sp2 = Spool(tmp_path / "spool")
    due = dict(sp2.recover())
    assert set(due) == {good, deferred}
    assert due[good] == 0.0 and due[deferred] == 4102444800.0
    assert sorted(sp2.ids("corrupt")) == sorted([trunc, "JUNK1"])
    reason = (tmp_path / "spool" / "corrupt" / f"{trunc}.reason").read_text()
    assert "truncated" in reason
    assert not stale.exists()
    assert not (tmp_path / "spool" / "active" / "GONE1.state").exists()
    with sp2.open(deferred) as h:
        assert h.state.rcpt("c@y.org").attempts == 1  # per-recipient state survived
    sp2.close()


async def test_a_message_is_locked_against_a_second_worker(tmp_path):
    sp = Spool(tmp_path / "spool")
    qid = await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), MSG)
    with sp.open(qid):
        with pytest.raises(Locked):
            sp.open(qid)
        code = textwrap.dedent(f"""
            import sys
            from filterd.queue import Spool, Locked
            try:
                Spool({str(tmp_path / 'spool')!r}).open({qid!r})
            except Locked:
                sys.exit(3)
            sys.exit(0)
        """)
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    with sp.open(qid):  # released
        pass
    sp.close()


def test_acknowledged_message_survives_kill_9_of_the_writer(tmp_path):
    """A process enqueues, prints the id only after enqueue returned, and is SIGKILLed at once:
    the message is complete in the spool for the next process."""
    code = textwrap.dedent(f"""
        import asyncio, os, sys
        from filterd.queue import Spool, Envelope
        async def main():
            sp = Spool({str(tmp_path / 'spool')!r})
            for i in range(50):
                qid = await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), b"X" * 10000 + b"%d" % i)
                print(qid, flush=True)
            os.kill(os.getpid(), 9)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    acked = proc.stdout.decode().split()
    assert len(acked) == 50
    sp = Spool(tmp_path / "spool")
    assert {q for q, _ in sp.recover()} >= set(acked)
    for i, q in enumerate(acked):
        with sp.open(q) as h:
            assert h.read_data() == b"X" * 10000 + b"%d" % i
    sp.close()


async def test_entries_list_state_for_the_queue_command(tmp_path):
    sp = Spool(tmp_path / "spool")
    qid = await sp.enqueue(Envelope("a@x.org", ["b@y.org", "c@y.org"]), MSG)
    with sp.open(qid) as h:
        h.state.rcpt("b@y.org").status = "delivered"
        h.state.rcpt("c@y.org").response = "451 4.3.0 later"
        h.save_state()
    (e,) = sp.entries()
    d = e.to_json()
    assert d["recipients"]["b@y.org"]["status"] == "delivered"
    assert d["recipients"]["c@y.org"]["status"] == "pending"
    assert d["recipients"]["c@y.org"]["response"] == "451 4.3.0 later"
    json.dumps(d)
    sp.close()


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_back_to_back_enqueues_never_stall(tmp_path, in_flight):
    """An enqueue issued right after another one returned (the listener spools a held copy
    just after the deliverable one) must start its own commit, never wait forever."""
    sp = Spool(tmp_path / "spool")
    sp.max_commits_in_flight = in_flight

    async def writer(n):
        for i in range(n):  # awaited directly: the next enqueue runs in the same wake-up
            await sp.enqueue(Envelope("a@x.org", ["b@y.org"]), MSG)
    async with asyncio.timeout(20):
        await asyncio.gather(*(writer(30) for _ in range(in_flight + 1)))
    assert len(sp.ids("active")) == 30 * (in_flight + 1)
    sp.close()
