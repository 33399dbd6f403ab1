"""Crash test: messages go through `filterd serve` (the real listener, pipeline, spool and
delivery) to Postfix's smtp-sink while the gateway is killed with SIGKILL several times and
restarted on the same spool. Every message that got 250 must reach the sink; duplicates are
counted and reported (a kill between the sink's 250 and the spool update re-sends a message:
a duplicate is allowed, a loss is not).

Counts are parameters: FILTERD_CRASH_MESSAGES (default 2000), FILTERD_CRASH_KILLS (default 4),
FILTERD_CRASH_WORKERS (default 1; >1 uses SMTP worker processes). A second, smaller run always
uses two worker processes (the process group is killed: workers and the delivering parent).
"""
from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from delivery_peers import free_port, have_smtp_sink
from gateway_fixtures import Sink

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = int(os.environ.get("FILTERD_CRASH_MESSAGES", "2000"))
KILLS = int(os.environ.get("FILTERD_CRASH_KILLS", "4"))
WORKERS = int(os.environ.get("FILTERD_CRASH_WORKERS", "1"))
CLIENTS = 8

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not have_smtp_sink(), reason="needs postfix's smtp-sink")]


class Serve:
    """`filterd serve` in its own process group, restartable on the same port and spool."""

    def __init__(self, state: Path, port: int, sink_port: int, workers: int):
        self.state, self.port, self.sink_port = state, port, sink_port
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log = open(state / "serve.log", "ab")

    def start(self) -> None:
        empty = self.state / "empty.toml"  # hermetic: never /etc/filterd/filterd.toml
        empty.touch()
        cmd = [sys.executable, "-m", "filterd", "serve", "--log-level", "warning",
               "--config", str(empty),
               "--listen", f"127.0.0.1:{self.port}", "--relayhost", f"127.0.0.1:{self.sink_port}",
               "--mynetworks", "127.0.0.0/8", "--spool", str(self.state / "spool"),
               "--set", f"server.state_dir={self.state}", "--set", "server.hostname=gw.test",
               "--set", "queue.scan_interval=1s", "--set", "delivery.retry_initial=500ms",
               "--set", "delivery.retry_max=1s", "--set", f"smtp.workers={self.workers}"]
        env = dict(os.environ)
        env.pop("FILTERD_CONFIG", None)
        self.log.write(f"--- start {self.starts}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=str(ROOT),
                                     env=env, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as s:
                    if s.noop()[0] == 250:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                self.log.flush()
                tail = (self.state / "serve.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"filterd serve exited {self.proc.returncode}:\n{tail}")
            time.sleep(0.05)
        raise AssertionError("filterd serve did not come up")

    def kill9(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.log.close()


def _body(token: int) -> bytes:
    return (f"From: crash@sender.test\r\nTo: sink@dest.test\r\nSubject: crash {token}\r\n"
            f"Message-ID: <crash-{token}@sender.test>\r\nX-Crash-Token: {token}\r\n\r\n"
            + "Some text of a few kilobytes.\r\n" * 60).encode()


@pytest.mark.parametrize("workers,messages,kills", [
    (WORKERS, MESSAGES, KILLS),
    (2, max(MESSAGES // 3, 50), max(KILLS // 2, 1)),
], ids=["main", "two-workers"])
def test_every_acknowledged_message_survives_repeated_kill_9(tmp_path, workers, messages, kills):
    MESSAGES, KILLS = messages, kills  # noqa: N806 - the module defaults, per run
    sink = Sink()
    state = tmp_path / "state"
    state.mkdir()
    serve = Serve(state, free_port(), sink.port, workers)
    serve.start()
    acked: set[int] = set()
    attempts_after_unknown: set[int] = set()  # sent again after an unanswered DATA
    lock = threading.Lock()
    todo = list(range(MESSAGES))
    done_sending = threading.Event()

    def client():
        conn = None
        while True:
            with lock:
                if not todo:
                    break
                token = todo.pop()
            sent = False
            uncertain = False
            while not sent:
                try:
                    if conn is None:
                        conn = smtplib.SMTP("127.0.0.1", serve.port, timeout=15)
                        conn.ehlo("client.test")
                    conn.sendmail("crash@sender.test", ["sink@dest.test"], _body(token))
                    sent = True
                except smtplib.SMTPResponseException as exc:
                    # 4xx (e.g. shutting down): try again; 5xx would be a bug
                    assert exc.smtp_code < 500, f"message {token} refused: {exc}"
                    uncertain = True
                    conn = None
                    time.sleep(0.05)
                except (OSError, smtplib.SMTPException):
                    uncertain = True  # the gateway died mid-transaction: maybe stored, no 250
                    conn = None
                    time.sleep(0.05)
            with lock:
                acked.add(token)
                if uncertain:
                    attempts_after_unknown.add(token)
        if conn is not None:
            try:
                conn.quit()
            except Exception:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()

    kills = 0
    try:
        # kill at evenly spaced points of the sending progress
        marks = [int(MESSAGES * (i + 1) / (KILLS + 1)) for i in range(KILLS)]
        for mark in marks:
            deadline = time.monotonic() + 120
            while len(acked) < mark and time.monotonic() < deadline and \
                    any(t.is_alive() for t in threads):
                time.sleep(0.01)
            serve.kill9()
            kills += 1
            time.sleep(0.2)
            serve.start()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "clients did not finish"
        done_sending.set()
        assert len(acked) == MESSAGES

        # let the last incarnation drain the spool into the sink
        deadline = time.monotonic() + 120
        seen: dict[int, int] = {}
        while time.monotonic() < deadline:
            seen = {}
            for m in sink.messages():
                mt = re.search(rb"X-Crash-Token: (\d+)", m)
                if mt:
                    seen[int(mt.group(1))] = seen.get(int(mt.group(1)), 0) + 1
            if set(seen) >= acked:
                break
            time.sleep(0.25)
    finally:
        serve.stop()
        sink_count = sink.count()
        sink.stop()

    lost = sorted(acked - set(seen))
    duplicates = {t: n for t, n in seen.items() if n > 1}
    print(f"\ncrash test ({workers} worker(s)): {MESSAGES} messages acknowledged, "
          f"{kills} SIGKILLs, "
          f"{serve.starts} starts, {sink_count} received by the sink, {len(lost)} lost, "
          f"{len(duplicates)} duplicated ({sum(duplicates.values()) - len(duplicates)} extra "
          f"copies; {len(set(duplicates) & attempts_after_unknown)} of them after a client "
          f"re-send)")
    assert kills == KILLS
    assert not lost, f"{len(lost)} acknowledged messages never reached the sink: {lost[:20]}"
    # no message the gateway never acknowledged appears out of nowhere
    assert set(seen) <= set(range(MESSAGES))
    # nothing left behind
    leftover = [p for p in (state / "spool" / "active").iterdir()] if \
        (state / "spool" / "active").exists() else []
    corrupt = list((state / "spool" / "corrupt").iterdir())
    assert corrupt == [], f"corrupt spool files after kill -9: {corrupt}"
    assert [p for p in leftover if not p.name.endswith(".sock")] == []
