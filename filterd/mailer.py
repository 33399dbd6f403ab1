"""Mail that filterd itself sends (list confirmations, list copies, digests, notices).

``await submit(services, sender, recipients, data)`` hands a message to the delivery core when
filterd runs as a gateway (``filterd serve`` registers ``services.extra["submit"]``: the message
is spooled durably and delivered like any other). Outside the gateway (CLI commands, milter-only
sites) it is sent over SMTP to ``[mailer] relay``. With neither, it raises :class:`MailerError`
with what to configure.
"""
from __future__ import annotations

import email.utils
import socket
import uuid


class MailerError(Exception):
    pass


def hostname(services) -> str:
    return services.config.get("server.hostname") or socket.getfqdn()


def make_message_id(services) -> str:
    return f"<{uuid.uuid4().hex}@{hostname(services)}>"


def format_date() -> str:
    return email.utils.formatdate(localtime=False, usegmt=True)


async def submit(services, sender: str, recipients: list[str], data: bytes,
                 meta: dict | None = None) -> str:
    """Queue or send ``data`` from ``sender`` (``""`` = null sender) to ``recipients``."""
    hook = services.extra.get("submit")
    if hook is not None:
        return await hook(sender, list(recipients), data, meta or {})
    relay = services.config.get("mailer.relay") or ""
    if not relay:
        raise MailerError("no way to send mail: run inside `filterd serve` (gateway mode) or set "
                          "[mailer] relay = \"host:port\" (e.g. your Postfix on 127.0.0.1:25)")
    await send_to_relay(relay, sender, recipients, data)
    return "sent"


async def send_to_relay(relay: str, sender: str, recipients: list[str], data: bytes) -> None:
    """Hand ``data`` to the SMTP relay ``"host:port"`` (``"[host]:port"``; port 25 when
    omitted). Raises :class:`MailerError` naming the relay when it fails or refuses."""
    import aiosmtplib

    host, _, port = relay.rpartition(":")
    if not host:
        host, port = relay, ""
    host = host.strip("[]") or "127.0.0.1"
    try:
        await aiosmtplib.send(data, sender=sender, recipients=list(recipients), hostname=host,
                              port=int(port or 25), timeout=60, start_tls=False, use_tls=False)
    except (aiosmtplib.SMTPException, OSError, ValueError) as exc:
        raise MailerError(f"relay {host}:{port or 25}: {exc}") from exc
