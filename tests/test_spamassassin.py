"""SpamAssassin plugin against a real spamd started here (Debian spamd, -L: no network tests):
GTUBE and a ham message through the pipeline; spamd down → the configured policy."""
from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time

import pytest

from filterd.verdict import Action

from conftest import GTUBE, make_message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spamd(tmp_path_factory):
    exe = shutil.which("spamd") or ("/usr/sbin/spamd" if os.path.exists("/usr/sbin/spamd")
                                    else None)
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("spamd is not installed (Debian package spamd; .ci/packages.d/spam.txt)")
        pytest.skip("spamd is not installed (apt-get install spamd)")
    tmp = tmp_path_factory.mktemp("spamd")
    port = free_port()
    cmd = [exe, "-L", "-m", "2", "-i", "127.0.0.1", "-p", str(port), "--nouser-config",
           "--syslog=stderr", "--pidfile", str(tmp / "spamd.pid")]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    log = open(tmp / "spamd.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90  # spamd compiles its rules at start: seconds
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"spamd exited {proc.returncode}: "
                            f"{(tmp / 'spamd.log').read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING SPAMC/1.5\r\n\r\n")
                    if b"PONG" in s.recv(100):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("spamd did not answer PING within 90s")
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sa_settings(port, *extra):
    return ["spamassassin.enabled=true", f"spamassassin.port={port}", *extra]


async def test_spamd_scores_gtube_as_spam_with_rule_symbols(pipeline_factory, spamd):
    pipe = await pipeline_factory(*sa_settings(spamd), "rules.shipped=false")
    res = await pipe.scan(make_message(body=f"Hi\r\n\r\n{GTUBE}\r\n"), "a@example.com",
                          ["bob@example.org"])
    syms = {s.name: s for s in res.symbols}
    assert syms["SPAMASSASSIN"].score >= 1000
    assert "GTUBE" in syms["SPAMASSASSIN"].options
    assert "SA_GTUBE" in syms
    assert res.action is Action.REJECT
    assert res.ctx.data["spamassassin"]["is_spam"] is True


async def test_spamd_scores_ordinary_mail_as_ham(pipeline_factory, spamd):
    pipe = await pipeline_factory(*sa_settings(spamd))
    body = ("Hi Bob,\r\n\r\nthe minutes of Tuesday's meeting are on the wiki; please add your "
            "comments before Friday.\r\n\r\nThanks,\r\nAlice\r\n")
    res = await pipe.scan(make_message(body=body, subject="Meeting minutes"), "alice@example.com",
                          ["bob@example.org"])
    syms = {s.name: s for s in res.symbols}
    assert "SPAMASSASSIN" in syms
    assert res.ctx.data["spamassassin"]["is_spam"] is False
    assert syms["SPAMASSASSIN"].score < 5
    assert res.action is Action.ACCEPT


async def test_spamd_down_skips_with_a_symbol_by_default(pipeline_factory):
    port = free_port()  # nothing listens there
    pipe = await pipeline_factory(*sa_settings(port))
    res = await pipe.scan(make_message(), "a@example.com", ["bob@example.org"])
    names = {s.name for s in res.symbols}
    assert "SPAMASSASSIN_UNAVAILABLE" in names and "SPAMASSASSIN" not in names
    assert res.action is Action.ACCEPT


async def test_spamd_down_tempfails_when_configured(pipeline_factory):
    pipe = await pipeline_factory(*sa_settings(free_port(), "spamassassin.on_unavailable=tempfail"))
    res = await pipe.scan(make_message(), "a@example.com", ["bob@example.org"])
    assert res.action is Action.TEMPFAIL
    assert res.outcomes["bob@example.org"].verdict.smtp_reply()[0] == 451


async def test_slow_spamd_is_treated_as_unavailable(pipeline_factory):
    # a server that accepts and never answers
    async def hang(reader, writer):
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pipe = await pipeline_factory(*sa_settings(port, "spamassassin.spamd_timeout=1s"))
        res = await pipe.scan(make_message(), "a@example.com", ["bob@example.org"])
    finally:
        server.close()
    sym = next(s for s in res.symbols if s.name == "SPAMASSASSIN_UNAVAILABLE")
    assert "1s" in sym.description
    assert res.action is Action.ACCEPT
