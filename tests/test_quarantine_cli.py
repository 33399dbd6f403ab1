"""`filterd quarantine list|show|release|delete|report|purge` on a real state directory."""
from __future__ import annotations

import json

import pytest
from conftest import run_filterd
from quarantine_support import Sink, overrides, quarantine_message, spam_message, unmarked


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


async def test_cli_list_show_release_delete_report(pipeline_factory, sink, tmp_path):
    ov = [f"server.state_dir={tmp_path / 'state'}", *overrides(sink.port)]
    pipe = await pipeline_factory(*overrides(sink.port))
    raw1 = spam_message(subject="cli one")
    await quarantine_message(pipe, raw1, "s@spam.example", ["bob@example.org"])
    await quarantine_message(pipe, spam_message(subject="cli two"), "s@spam.example",
                             ["eve@example.org"])
    await pipe.close()
    empty = tmp_path / "filterd.toml"  # not the machine's /etc/filterd/filterd.toml
    empty.write_text("")
    args = ["--config", str(empty), *[a for o in ov for a in ("--set", o)]]

    out = run_filterd("quarantine", "list", "--json", *args, check=True).stdout.decode()
    entries = {json.loads(line)["subject"]: json.loads(line) for line in out.splitlines()}
    assert set(entries) == {"cli one", "cli two"}
    one, two = entries["cli one"]["id"], entries["cli two"]["id"]
    out = run_filterd("quarantine", "list", "--rcpt", "eve@example.org", *args,
                      check=True).stdout.decode()
    assert "cli two" in out and "cli one" not in out

    show = run_filterd("quarantine", "show", "--raw", one, *args, check=True).stdout
    assert show == raw1
    assert b"GTUBE" in run_filterd("quarantine", "show", one, *args, check=True).stdout

    dry = run_filterd("quarantine", "report", *args, check=True).stdout.decode()
    assert "To: bob@example.org" in dry and "cli one" in dry
    assert sink.matching(lambda m: True) == []  # a dry run sends nothing
    sent = run_filterd("quarantine", "report", "--send", *args, check=True).stdout.decode()
    assert "sent digest to bob@example.org" in sent and "sent digest to eve@example.org" in sent
    await sink.wait_for(lambda m: m.rcpt_tos == ["eve@example.org"])

    out = run_filterd("quarantine", "release", one, *args, check=True).stdout.decode()
    assert f"{one} released" in out
    got = await sink.wait_for(lambda m: m.message["Subject"] == "cli one")
    assert unmarked(got.data) == raw1
    assert run_filterd("quarantine", "delete", two, *args, check=True).returncode == 0
    assert run_filterd("quarantine", "list", *args, check=True).stdout.strip() == b""
    bad = run_filterd("quarantine", "release", one, *args)
    assert bad.returncode == 1 and f"no held entry {one}".encode() in bad.stderr
    assert run_filterd("quarantine", "purge", *args, check=True).returncode == 0


async def test_cli_release_with_relay_down_names_the_relay_and_keeps_the_entry(
        pipeline_factory, tmp_path):
    from quarantine_support import free_port

    dead = free_port()  # nothing listens there
    ov = [f"server.state_dir={tmp_path / 'state'}", *overrides(dead)]
    pipe = await pipeline_factory(*overrides(dead))
    await quarantine_message(pipe, spam_message(), "s@spam.example", ["bob@example.org"])
    [e] = await pipe.services.extra["quarantine"].qstore.entries_for("bob@example.org")
    await pipe.close()
    empty = tmp_path / "filterd.toml"  # not the machine's /etc/filterd/filterd.toml
    empty.write_text("")
    args = ["--config", str(empty), *[a for o in ov for a in ("--set", o)]]
    p = run_filterd("quarantine", "release", e.id, *args)
    assert p.returncode == 1
    assert f"relay 127.0.0.1:{dead}".encode() in p.stderr and b"[quarantine] relay" in p.stderr
    assert e.id.encode() in run_filterd("quarantine", "list", *args, check=True).stdout
