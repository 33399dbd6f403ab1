"""`filterd queue list|show|flush|delete|hold|release|requeue` on a real spool, with and
without a running delivery core."""
from __future__ import annotations

import asyncio
import json

import pytest

from conftest import run_filterd
from delivery_peers import CaptureServer, make_core, wait_for
from filterd.queue import Envelope, Spool

MSG = b"From: a@sender.test\r\nTo: b@dest.test\r\nSubject: queued\r\n\r\nbody\r\n"


def q(spool_dir, *args):
    empty = spool_dir.parent / "empty.toml"  # hermetic: never /etc/filterd/filterd.toml
    empty.parent.mkdir(parents=True, exist_ok=True)
    empty.touch()
    return run_filterd("queue", *args, "--spool", str(spool_dir), "--config", str(empty))


async def _fill(spool_dir, n=2, **kw):
    sp = Spool(spool_dir)
    ids = [await sp.enqueue(Envelope("a@sender.test", [f"b{i}@dest.test", "c@dest.test"], **kw),
                            MSG) for i in range(n)]
    sp.close()
    return ids


def test_list_empty_spool_and_missing_spool(tmp_path):
    Spool(tmp_path / "spool").close()
    p = q(tmp_path / "spool", "list")
    assert p.returncode == 0 and "Mail queue is empty" in p.stdout.decode()
    p = q(tmp_path / "spool", "list", "--json")
    assert json.loads(p.stdout) == []
    p = q(tmp_path / "nothing", "list")
    assert p.returncode == 1 and "no spool at" in p.stderr.decode()


async def test_list_and_show_messages_with_per_recipient_state(tmp_path):
    ids = await _fill(tmp_path / "spool")
    sp = Spool(tmp_path / "spool")
    with sp.open(ids[0]) as h:
        h.state.rcpt("b0@dest.test").status = "delivered"
        h.state.rcpt("c@dest.test").response = "451 4.3.0 greylisted"
        h.state.attempts = 1
        h.save_state()
    sp.close()
    p = q(tmp_path / "spool", "list", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["queue_id"]: r for r in json.loads(p.stdout)}
    assert set(rows) == set(ids)
    r = rows[ids[0]]
    assert r["mail_from"] == "a@sender.test" and r["area"] == "active" and r["attempts"] == 1
    assert r["recipients"]["b0@dest.test"]["status"] == "delivered"
    assert r["recipients"]["c@dest.test"]["response"] == "451 4.3.0 greylisted"
    text = q(tmp_path / "spool", "list").stdout.decode()
    assert ids[0] in text and "451 4.3.0 greylisted" in text and "2 message(s)" in text
    p = q(tmp_path / "spool", "show", ids[0], "--json", "--data")
    d = json.loads(p.stdout)
    assert d["data"] == MSG.decode() and d["envelope"]["recipients"][1] == "c@dest.test"
    p = q(tmp_path / "spool", "show", "NOSUCHID")
    assert p.returncode == 1 and "no message NOSUCHID" in p.stderr.decode()


async def test_hold_release_delete_requeue_flush(tmp_path):
    spool_dir = tmp_path / "spool"
    a, b = await _fill(spool_dir)
    assert q(spool_dir, "hold", a).returncode == 0
    sp = Spool(spool_dir)
    assert sp.ids("hold") == [a] and sp.ids("active") == [b]
    before = sp.flush_mtime()
    p = q(spool_dir, "release", a, "--json")
    assert json.loads(p.stdout) == [{"queue_id": a, "ok": True}]
    assert sorted(sp.ids("active")) == sorted([a, b]) and sp.flush_mtime() > before
    # release applies to held messages only
    p = q(spool_dir, "release", b)
    assert p.returncode == 1 and "is in active/" in p.stderr.decode()
    # requeue brings a message back from failed/ with a fresh error count
    with sp.open(b) as h:
        h.state.internal_errors = 5
        h.state.next_attempt = 4102444800.0
        h.save_state()
        h.move("failed")
    assert q(spool_dir, "requeue", "--all").returncode == 0
    with sp.open(b) as h:
        assert h.area == "active" and h.state.internal_errors == 0 and h.state.next_attempt == 0
        h.state.next_attempt = 4102444800.0
        h.save_state()
    assert q(spool_dir, "flush").returncode == 0
    with sp.open(b) as h:
        assert h.state.next_attempt == 0
    p = q(spool_dir, "delete", a, "NOSUCHID")
    assert p.returncode == 1 and "NOSUCHID: not in the queue" in p.stderr.decode()
    assert sp.ids("active") == [b]
    sp.close()


async def test_a_message_being_delivered_is_reported_busy_not_touched(tmp_path):
    spool_dir = tmp_path / "spool"
    (a,) = await _fill(spool_dir, 1)
    sp = Spool(spool_dir)
    with sp.open(a):  # as the delivery core holds it during an attempt
        p = q(spool_dir, "delete", a, "--wait", "0.2")
    assert p.returncode == 1 and "being delivered right now" in p.stderr.decode()
    assert sp.ids("active") == [a]
    sp.close()


async def test_release_reaches_a_running_gateway(tmp_path):
    cap = CaptureServer()
    state = tmp_path / "state"
    state.mkdir()
    core = await make_core(state, f"delivery.relayhost=[127.0.0.1]:{cap.port}",
                           "queue.scan_interval=1h")
    try:
        qid = await core.spool.enqueue(Envelope("a@sender.test", ["held@dest.test"], hold=True),
                                       MSG)
        core.notify(qid)  # held: a notify must not deliver it
        await asyncio.sleep(0.5)
        assert cap.handler.messages == []
        p = await asyncio.to_thread(q, state / "spool", "release", qid)
        assert p.returncode == 0, p.stderr
        await wait_for(lambda: cap.handler.to("held@dest.test"), what="released delivery")
    finally:
        await core.stop()
        cap.stop()


@pytest.mark.parametrize("area", ["active", "hold", "failed", "corrupt", "all"])
def test_list_accepts_each_area(tmp_path, area):
    Spool(tmp_path / "spool").close()
    p = q(tmp_path / "spool", "list", "--area", area, "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == []
