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


def test_track_follows_a_message_delivered_deferred_and_bounced(tmp_path):
    good = Sink()
    soft = Sink(extra=("-r", "rcpt"))  # answers 4xx to every RCPT
    gw = Gateway(tmp_path, "--set", f'delivery.transports."ok.test"="smtp:127.0.0.1:{good.port}"',
                 "--set", f'delivery.transports."slow.test"="smtp:127.0.0.1:{soft.port}"',
                 "--set", 'smtp.relay_domains=["ok.test", "slow.test"]',
                 "--set", "delivery.retry_initial=1s", "--set", "delivery.retry_max=1s",
                 "--set", "delivery.max_lifetime=3s", "--set", "queue.scan_interval=1s")
    try:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as s:
            s.sendmail("carol@sender.test", ["ann@ok.test", "bob@slow.test"],
                       b"From: carol@sender.test\r\nSubject: journey\r\n\r\nHello.\r\n")
        good.wait_count(1, 30)

        def journey():
            out = filterd(gw.state, "track", "--from", "carol@sender.test", "--json").stdout
            return json.loads(out) if out.strip() else None

        def bounced():
            j = journey()
            return j if j and j["state"].get("bob@slow.test") == "bounced" else None

        from gateway_fixtures import wait_for
        j = wait_for(bounced, 60, "the bounce of bob@slow.test in the trace")
        kinds = [(e["event"], e.get("rcpt")) for e in j["events"]]
        assert ("arrival", "ann@ok.test") in kinds and ("arrival", "bob@slow.test") in kinds
        assert ("delivered", "ann@ok.test") in kinds
        assert ("deferred", "bob@slow.test") in kinds
        assert kinds[-1] == ("bounced", "bob@slow.test")
        assert j["state"] == {"ann@ok.test": "delivered", "bob@slow.test": "bounced"}
        text = filterd(gw.state, "track", "--id", j["id"]).stdout
        assert "delivered" in text and "deferred" in text and "bounced" in text
    finally:
        gw.stop()
        good.stop()
        soft.stop()


def test_aliases_expand_before_policy_through_the_gateway(tmp_path):
    sink = Sink()
    aliases = tmp_path / "aliases"
    aliases.write_text("sales: ann, ceo\nceo: boss@corp.test\n")
    gw = Gateway(tmp_path, "--relayhost", f"127.0.0.1:{sink.port}",
                 "--set", 'smtp.relay_domains=["corp.test"]', "--set", f"aliases.file={aliases}",
                 "--set", 'actions.recipients."boss@corp.test".quarantine=0.5')
    try:
        send(gw.port, "x@remote.test", "sales@corp.test", subject="FREE MONEY NOW!!!!")
        [m] = [email.message_from_bytes(b) for b in sink.wait_count(1, 30)]
        assert m["X-Rcpt-Args"] == "<ann@corp.test>"  # the quarantined boss copy is held
        out = filterd(gw.state, "track", "--to", "boss@corp.test", "--json").stdout
        assert json.loads(out)["events"][0]["action"] == "quarantine"
    finally:
        gw.stop()
        sink.stop()
