"""Mailing lists over SMTP through the real gateway to a real downstream (smtp-sink): subscribe
with confirmation, a member's post with VERP copies, and `filterd track` on the message."""
from __future__ import annotations

import email
import json
import re
import smtplib
import subprocess
import sys
import time

from gateway_fixtures import Gateway, Sink


def send(port, sender, rcpt, subject="hi", body="Hello.\r\n"):
    msg = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Date: Fri, 27 Nov 2026 09:00:00 +0000\r\nMessage-ID: <{time.time_ns()}@x.test>\r\n"
           f"\r\n{body}")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg.encode())


def filterd(state, *args):
    return subprocess.run([sys.executable, "-m", "filterd", *args, "--set",
                           f"server.state_dir={state}"], capture_output=True, text=True)


def test_subscribe_confirm_and_post_over_smtp(tmp_path):
    sink = Sink()
    gw = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}",
                 "--set", 'smtp.relay_domains=["lists.test"]')
    try:
        assert filterd(gw.state, "list", "create", "team@lists.test", "--owner",
                       "boss@corp.test").returncode == 0
        assert filterd(gw.state, "list", "add", "team@lists.test",
                       "bob@remote.test").returncode == 0
        send(gw.port, "ann@remote.test", "team-subscribe@lists.test")
        [conf] = [email.message_from_bytes(m) for m in sink.wait_count(1, 30)]
        assert conf["To"] == "ann@remote.test"
        confirm = conf["Reply-To"]
        assert re.fullmatch(r"team-confirm\+[0-9a-f]{24}@lists\.test", confirm)
        send(gw.port, "ann@remote.test", confirm, subject="Re: " + conf["Subject"])
        msgs = [email.message_from_bytes(m) for m in sink.wait_count(2, 30)]
        assert "Welcome to team@lists.test" in [m["Subject"] for m in msgs]
        shown = json.loads(filterd(gw.state, "list", "show", "team@lists.test", "--json").stdout)
        assert shown["members"] == ["ann@remote.test", "bob@remote.test"]
        send(gw.port, "bob@remote.test", "team@lists.test", subject="Agenda")
        copies = [c for c in map(email.message_from_bytes, sink.wait_count(4, 30))
                  if c["Subject"] == "Agenda"]
        assert sorted(c["To"] for c in copies) == ["team@lists.test", "team@lists.test"]
        assert all(c["List-Id"] == "<team.lists.test>" for c in copies)
        # smtp-sink records the envelope: each copy has its member's VERP bounce address
        envelopes = sorted((c["X-Mail-Args"] or "", c["X-Rcpt-Args"] or "") for c in copies)
        assert envelopes == [("<team-bounces+ann=remote.test@lists.test>", "<ann@remote.test>"),
                             ("<team-bounces+bob=remote.test@lists.test>", "<bob@remote.test>")]
        # the message trace shows the post: arrival, consumed by the list
        out = filterd(gw.state, "track", "--from", "bob@remote.test", "--to", "team@lists.test",
                      "--json").stdout
        post = json.loads(out.splitlines()[-1])
        assert post["events"][0]["action"] == "discard"
        assert "handled by list team@lists.test (post)" in post["events"][0]["detail"]["reason"]
    finally:
        gw.stop()
        sink.stop()
