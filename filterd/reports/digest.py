"""Quarantine digests: one mail per recipient listing what was held for them since their last
digest (HTML and plain-text alternatives), at each user's frequency, plus an admin summary.

``filterd quarantine report [--send]`` runs :func:`run_reports` (from cron or a systemd timer).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from .render import make_env

PERIODS = {"hourly": 3600, "daily": 86400, "weekly": 7 * 86400}
# A digest run from cron every hour/day may come a little early: allow 10% slack.
SLACK = 0.9


@dataclass
class Digest:
    to: str
    subject: str
    text: str
    html: str
    entries: list = field(default_factory=list)
    admin: bool = False


def _view(service, e) -> dict:
    d = e.to_dict()
    d["links"] = ({a: service.action_url(a, e) for a in ("release", "delete", "allow", "block")}
                  if service.base_url else {})
    d["mailto"] = {a: service.mailto(a, e) for a in ("release", "delete", "allow", "block")}
    d["top_symbols"] = sorted(e.symbols, key=lambda s: -abs(s[1]))[:5]
    return d


def render_user_digest(service, recipient: str, entries: list, total_held: int,
                       env=None) -> Digest:
    env = env or make_env(service.config)
    opts = service.options["digest"]
    shown = entries[: opts["max_entries"]]
    ctx = {
        "recipient": recipient,
        "entries": [_view(service, e) for e in shown],
        "more": max(len(entries) - len(shown), 0),
        "total_held": total_held,
        "list_url": service.login_url(recipient) if service.base_url else "",
        "retention_days": int(service.qstore.retention // 86400),
        "mail_release": bool(service.options.get("command_address")),
    }
    subject = opts["subject"].format(count=len(entries))
    return Digest(recipient, subject, env.get_template("digest.txt.j2").render(ctx),
                  env.get_template("digest.html.j2").render(ctx), entries)


def render_admin_digest(service, entries: list, since: float, env=None) -> Digest:
    env = env or make_env(service.config)
    per_rcpt = Counter(e.recipient for e in entries)
    senders = Counter((e.sender or "<>") for e in entries)
    new = [e for e in entries if e.received_at > since]
    ctx = {
        "total": len(entries), "new": len(new),
        "per_recipient": per_rcpt.most_common(50),
        "top_senders": senders.most_common(20),
        "recent": [e.to_dict() for e in new[:100]],
    }
    subject = f"Quarantine summary: {len(new)} new, {len(entries)} held"
    return Digest(service.options["digest"]["admin_address"], subject,
                  env.get_template("admin.txt.j2").render(ctx),
                  env.get_template("admin.html.j2").render(ctx), new, admin=True)


async def _state(service, key: str) -> dict:
    return await service.qstore.store.get_json(f"quarantine:digest:{key}") or {}


async def run_reports(service, send: bool = False, force: bool = False,
                      recipients: list[str] | None = None, now: float | None = None,
                      admin: bool = True) -> list[Digest]:
    """Build (and with ``send``, mail) every digest that is due. Marks the entries as reported
    only when sent, so a dry run changes nothing."""
    now = now or time.time()
    env = make_env(service.config)
    default_freq = service.options["digest"]["frequency"]
    held = await service.qstore.all_entries()
    by_rcpt: dict[str, list] = {}
    for e in held:
        by_rcpt.setdefault(e.recipient, []).append(e)
    wanted = {r.lower() for r in recipients} if recipients else None
    out: list[Digest] = []
    for rcpt, entries in sorted(by_rcpt.items()):
        if wanted is not None and rcpt not in wanted:
            continue
        prefs = await service.qstore.prefs(rcpt)
        freq = prefs.get("frequency") or default_freq
        state = await _state(service, rcpt)
        if freq == "never" and not force:
            continue
        if not force and now - state.get("sent_at", 0) < PERIODS.get(freq, 86400) * SLACK:
            continue
        seen = state.get("seen_until", 0)
        new = [e for e in entries if e.received_at > seen]
        if not new:
            continue
        d = render_user_digest(service, rcpt, new, len(entries), env)
        out.append(d)
        if send:
            await service.send(rcpt, d.subject, d.text, d.html)
            await service.qstore.store.set_json(f"quarantine:digest:{rcpt}", {
                "sent_at": now, "seen_until": max(e.received_at for e in new)})
    admin_to = service.options["digest"]["admin_address"]
    if admin and admin_to and wanted is None:
        state = await _state(service, "@admin")
        d = render_admin_digest(service, held, state.get("seen_until", 0), env)
        if d.entries or force:
            out.append(d)
            if send:
                await service.send(admin_to, d.subject, d.text, d.html)
                await service.qstore.store.set_json("quarantine:digest:@admin", {
                    "sent_at": now, "seen_until": max((e.received_at for e in d.entries),
                                                      default=now)})
    return out
