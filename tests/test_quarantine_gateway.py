"""Through the real SMTP gateway (`filterd serve`): a GTUBE message is quarantined by the
gateway's call to the quarantine service, the digest is sent by `filterd quarantine report
--send`, the release link is followed over HTTP (pages served by the gateway process itself),
and the released message reaches the sink through the gateway's spool and delivery core —
without being quarantined again. The same with release by mail sent through the gateway."""
from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import aiosmtplib
import pytest

pytest.importorskip("filterd.smtp", reason="the SMTP gateway is not part of this tree")
gateway_fixtures = pytest.importorskip("gateway_fixtures")

from conftest import run_filterd
from quarantine_support import Sink, free_port, links, parts, spam_message


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
def gateway(tmp_path, sink):
    web_port = free_port()
    config = f"""
[actions]
reject = 100000.0
quarantine = 10.0
[delivery]
relayhost = "[127.0.0.1]:{sink.port}"
tls = "none"
[quarantine]
enabled = true
web_listen = "127.0.0.1:{web_port}"
base_url = "http://127.0.0.1:{web_port}"
command_address = "quarantine@gw.test"
sender = "quarantine@gw.test"
secret = "gateway-test-secret-0123456789"
relay = "127.0.0.1:{sink.port}"
"""
    gw = gateway_fixtures.Gateway(tmp_path, config_text=config)
    gw.cli = ["--config", str(gw.state / "filterd.toml"),
              "--set", f"server.state_dir={gw.state}", "--set", "server.hostname=gw.test"]
    yield gw
    assert gw.stop() == 0, gw.log()


def _digest(m):
    return (m.message["Subject"] or "").startswith("Quarantine:") and "held" in m.message["Subject"]


async def _held(gw, rcpt: str, n: int = 1) -> list[dict]:
    for _ in range(200):
        out = run_filterd("quarantine", "list", "--json", "--rcpt", rcpt, *gw.cli, check=True)
        rows = [json.loads(x) for x in out.stdout.decode().splitlines()]
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing held for {rcpt}:\n{gw.log()}")


async def test_gateway_quarantine_digest_http_release_reaches_sink(gateway, sink):
    raw = spam_message(subject="via the gateway")
    code, _ = await aiosmtplib.send(raw, sender="spammer@spam.example",
                                    recipients=["bob@example.org"], hostname="127.0.0.1",
                                    port=gateway.port)
    [entry] = await _held(gateway, "bob@example.org")
    assert entry["subject"] == "via the gateway"
    assert not sink.matching(lambda m: m.message["Subject"] == "via the gateway")

    sent = run_filterd("quarantine", "report", "--send", *gateway.cli, check=True)
    assert b"sent digest to bob@example.org" in sent.stdout
    digest = await sink.wait_for(_digest)
    _, html = parts(digest)
    [release] = links(html, "release")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(release) as r:
            page = await r.text()
            assert r.status == 200, page
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        async with http.post(release, data={"csrf": csrf}) as r:
            assert r.status == 200 and "released" in await r.text()
    got = await sink.wait_for(lambda m: m.message["Subject"] == "via the gateway")
    assert got.rcpt_tos == ["bob@example.org"]
    assert raw.split(b"\r\n\r\n", 1)[1] in got.data  # body intact
    assert run_filterd("quarantine", "list", *gateway.cli, check=True).stdout.strip() == b""
    # released through the gateway's own queue and delivery core (not the relay, not the filter)
    log = gateway.log()
    assert f"quarantine release entry={entry['id']}" in log
    # two deliveries to bob by the core: the digest (queued by the CLI) and the released mail
    assert len(re.findall(r"filterd\.delivery: (?:delivery: )?\S+ to=<bob@example\.org> "
                          r".*status=sent", log)) == 2, log
    assert log.count("action=quarantine") == 1, log  # scanned (and held) once, not again


async def test_gateway_release_by_mail(gateway, sink):
    raw = spam_message(subject="mail me back", to="carol@example.org")
    await aiosmtplib.send(raw, sender="spammer@spam.example", recipients=["carol@example.org"],
                          hostname="127.0.0.1", port=gateway.port)
    await _held(gateway, "carol@example.org")
    run_filterd("quarantine", "report", "--send", *gateway.cli, check=True)
    digest = await sink.wait_for(_digest)
    _, html = parts(digest)
    [mailto] = links(html, "mailto-release")
    address = mailto.removeprefix("mailto:").split("?")[0]
    cmd = f"From: carol@example.org\r\nTo: {address}\r\nSubject: release\r\n\r\nplease\r\n"
    await aiosmtplib.send(cmd.encode(), sender="carol@example.org", recipients=[address],
                          hostname="127.0.0.1", port=gateway.port)
    got = await sink.wait_for(lambda m: m.message["Subject"] == "mail me back")
    assert got.rcpt_tos == ["carol@example.org"]
    confirm = await sink.wait_for(lambda m: m.message["Subject"] == "Quarantine: done")
    assert confirm.rcpt_tos == ["carol@example.org"]
    # the command mail itself went nowhere
    assert not sink.matching(lambda m: any(r.startswith("quarantine+") for r in m.rcpt_tos))
