"""Delivery status notifications (RFC 3464 multipart/report; RFC 3461 NOTIFY/RET/ENVID/ORCPT).

Rules that keep filterd from producing backscatter:

- never to the null sender (a bounce of a bounce);
- only for mail filterd accepted with 250 and then could not deliver (mail refused during the
  SMTP session got its refusal there and never reaches the queue);
- honour NOTIFY (NEVER / without FAILURE / without DELAY) and RET=HDRS.
"""
from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass

from ..queue.spool import Envelope


@dataclass
class RecipientReport:
    recipient: str
    action: str  # failed | delayed
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str = ""  # the next hop's reply ("550 5.1.1 no such user"), "" if none
    remote_mta: str = ""  # host name of the next hop that answered
    last_attempt: float = 0.0
    will_retry_until: float = 0.0  # delayed only
    text: str = ""  # our explanation for the human-readable part ("" = the diagnostic)


def wants_notify(envelope: Envelope, recipient: str, kind: str) -> bool:
    """Whether the sender asked for (or by default gets) a DSN of ``kind`` ('FAILURE' or
    'DELAY') for ``recipient``. Never for the null sender."""
    if not envelope.mail_from:
        return False
    params = envelope.rcpt_params.get(recipient) or {}
    notify = {k.upper(): v for k, v in params.items()}.get("NOTIFY")
    if not notify:
        return True
    words = {w.strip().upper() for w in str(notify).split(",")}
    if "NEVER" in words:
        return False
    return kind in words


def _rfc822_date(t: float) -> str:
    return email.utils.formatdate(t, localtime=False, usegmt=True)


def build_dsn(envelope: Envelope, original: bytes, reports: list[RecipientReport],
              reporting_mta: str, bounce_from: str = "MAILER-DAEMON",
              max_body: int = 65536) -> bytes:
    """The DSN message (bytes, CRLF) addressed to ``envelope.mail_from``."""
    delayed = all(r.action == "delayed" for r in reports)
    boundary = f"{envelope.queue_id or 'dsn'}.{secrets.token_hex(8)}/{reporting_mta}"
    now = time.time()
    frm = bounce_from if "@" in bounce_from else f"{bounce_from}@{reporting_mta}"
    subject = ("Delayed Mail (still being retried)" if delayed
               else "Undelivered Mail Returned to Sender")
    lines = [
        f"From: Mail Delivery System <{frm}>",
        f"To: <{envelope.mail_from}>",
        f"Subject: {subject}",
        f"Date: {_rfc822_date(now)}",
        f"Message-ID: <{secrets.token_hex(10)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        f"This is the mail system at host {reporting_mta}.",
        "",
    ]
    if delayed:
        lines += ["Your message could not be delivered yet to the recipients below.",
                  "It is still in the queue and delivery will be retried; you do not need",
                  "to send it again.", ""]
    else:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", ""]
    for r in reports:
        why = r.text or r.diagnostic or r.status
        lines.append(f"<{r.recipient}>: {why}" + (f" (from {r.remote_mta})" if r.remote_mta
                                                   else ""))
    lines += ["", f"--{boundary}",
              "Content-Type: message/delivery-status",
              "Content-Description: Delivery report",
              "",
              f"Reporting-MTA: dns; {reporting_mta}",
              f"X-Filterd-Queue-ID: {envelope.queue_id}"]
    envid = {k.upper(): v for k, v in envelope.mail_params.items()}.get("ENVID")
    if envid:
        lines.append(f"Original-Envelope-Id: {envid}")
    lines.append(f"Arrival-Date: {_rfc822_date(envelope.received_at or now)}")
    for r in reports:
        lines.append("")
        lines.append(f"Final-Recipient: rfc822; {r.recipient}")
        orcpt = {k.upper(): v for k, v in (envelope.rcpt_params.get(r.recipient) or {}).items()
                 }.get("ORCPT")
        if orcpt:
            lines.append(f"Original-Recipient: {orcpt}")
        lines.append(f"Action: {r.action}")
        lines.append(f"Status: {r.status}")
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.diagnostic:
            diag = r.diagnostic.replace("\r", " ").replace("\n", " ")
            lines.append(f"Diagnostic-Code: smtp; {diag}")
        if r.last_attempt:
            lines.append(f"Last-Attempt-Date: {_rfc822_date(r.last_attempt)}")
        if r.will_retry_until:
            lines.append(f"Will-Retry-Until: {_rfc822_date(r.will_retry_until)}")
    lines += ["", f"--{boundary}"]
    ret = {k.upper(): v for k, v in envelope.mail_params.items()}.get("RET", "")
    head, sep, body = original.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = original.partition(b"\n\n")
    headers_only = str(ret).upper() == "HDRS" or delayed or len(original) > max_body
    out = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    if headers_only:
        out += b"Content-Type: text/rfc822-headers\r\nContent-Description: Undelivered Message " \
               b"Headers\r\n\r\n" + _crlf(head) + b"\r\n"
    else:
        cte = b"8bit" if any(b > 127 for b in original) else b"7bit"
        out += b"Content-Type: message/rfc822\r\nContent-Description: Undelivered Message\r\n" \
               b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n" + _crlf(original)
        if not out.endswith(b"\r\n"):
            out += b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode()
    return out


def _crlf(b: bytes) -> bytes:
    if b.count(b"\n") != b.count(b"\r\n"):
        b = b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return b


def dsn_envelope(envelope: Envelope) -> Envelope:
    """The envelope of a DSN: from the null sender to the original sender."""
    return Envelope(mail_from="", recipients=[envelope.mail_from],
                    meta={"dsn_for": envelope.queue_id})
