"""Every message of the MIME torture collections (Stalwart mail-parser, mime4j, MIME-tools)
goes through the real `filterd check`: no crash, a verdict for each, parsed views usable."""
from __future__ import annotations

import json
import time

import pytest

from conftest import DATA, run_filterd

MIME = DATA / "mime"
MESSAGES = sorted(p for p in MIME.rglob("*") if p.suffix in (".eml", ".msg"))


def test_the_torture_collections_are_present():
    assert len(MESSAGES) > 150


@pytest.mark.timeout(600)
def test_every_torture_message_gets_a_verdict_without_crashing():
    proc = run_filterd("check", "--json", "--rcpt", "user@example.org",
                       *map(str, MESSAGES), timeout=600)
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    assert [d["file"] for d in lines] == list(map(str, MESSAGES))
    for d in lines:
        assert d["recipients"] == {"user@example.org": d["action"]}
        assert d["action"] in {"accept", "add_header", "quarantine", "reject"}, d


def test_parsed_view_of_every_torture_message_is_usable_and_bounded():
    from filterd.model import Message

    slowest = 0.0
    for path in MESSAGES:
        t0 = time.process_time()
        m = Message(path.read_bytes())
        p = m.parsed
        # touch every lazily built view: none may raise
        _ = (p.headers, p.subject, p.from_address, p.parts, p.attachments, p.text_parts,
             p.urls, p.url_hosts, p.defects)
        for part in p.parts:
            assert part.size == len(part.payload)
        slowest = max(slowest, time.process_time() - t0)
    print(f"slowest parse: {slowest * 1000:.1f} ms CPU")
