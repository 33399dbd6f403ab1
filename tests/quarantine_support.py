"""Helpers for the quarantine tests: a capturing SMTP server (aiosmtpd on loopback), free
ports, a pipeline with the quarantine configured, digest parsing."""
from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from conftest import GTUBE, make_message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list
    data: bytes

    @property
    def message(self):
        return email.message_from_bytes(self.data, policy=email.policy.default)


class _Handler:
    def __init__(self, sink):
        self.sink = sink

    async def handle_DATA(self, server, session, envelope):
        with self.sink.lock:
            self.sink.messages.append(Captured(envelope.mail_from, list(envelope.rcpt_tos),
                                               envelope.original_content or envelope.content))
        return "250 OK captured"


@dataclass
class Sink:
    """A real SMTP server on 127.0.0.1 that keeps every message it receives."""
    port: int = 0
    messages: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller: Controller | None = None

    def start(self):
        self.port = free_port()
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()

    async def wait_for(self, pred, timeout: float = 20.0) -> Captured:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for m in self.messages:
                    if pred(m):
                        return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching message at the sink; got "
                             f"{[(m.rcpt_tos, m.message['Subject']) for m in self.messages]}")

    def matching(self, pred) -> list:
        with self.lock:
            return [m for m in self.messages if pred(m)]


def spam_message(subject: str = "Cheap watches", sender: str = "spammer@spam.example",
                 to: str = "bob@example.org") -> bytes:
    return make_message(body=f"Buy now!\r\n{GTUBE}\r\n", subject=subject, sender=sender, to=to)


def overrides(sink_port: int, web_port: int | None = None, *extra: str) -> list[str]:
    ov = [
        "quarantine.enabled=true",
        "actions.reject=100000",  # GTUBE's score lands in quarantine, not reject
        "actions.quarantine=10",
        f"quarantine.relay=127.0.0.1:{sink_port}",
        "quarantine.sender=quarantine@gw.test",
        "quarantine.command_address=quarantine@gw.test",
        "quarantine.secret=test-secret-0123456789abcdef",
    ]
    if web_port is not None:
        ov += [f"quarantine.web_listen=127.0.0.1:{web_port}",
               f"quarantine.base_url=http://127.0.0.1:{web_port}"]
    return ov + list(extra)


async def quarantine_message(pipe, raw: bytes, sender: str, rcpts: list[str]):
    """What a front door does: scan, then hand quarantined recipients to the hold service."""
    result = await pipe.scan(raw, sender, rcpts)
    service = pipe.services.extra["quarantine"]
    held = await service.hold_quarantined(result)
    return result, held


def parts(captured: Captured) -> tuple[str, str]:
    """(text, html) alternatives of a digest."""
    msg = captured.message
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    return text, html


def links(html: str, cls: str) -> list[str]:
    return [m.replace("&amp;", "&") for m in re.findall(
        rf'<a class="{cls}" href="([^"]+)"', html)]


def unmarked(data: bytes) -> bytes:
    """A released message as the relay got it, without filterd's signed release mark (the one
    header filterd prepends on the relay path); asserts the mark is there."""
    assert data.startswith(b"X-Filterd-Released: "), data[:200]
    return data.split(b"\r\n", 1)[1]
