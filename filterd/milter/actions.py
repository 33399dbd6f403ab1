"""From a :class:`filterd.pipeline.ScanResult` to milter actions.

Pure logic, no libmilter: :func:`plan` returns a :class:`MilterPlan` that the milter session
applies inside its end-of-message callback (the only place libmilter allows modifications).

How per-recipient outcomes become one milter reply (a milter can only accept, reject, tempfail
or discard the *whole* message at end of message, and remove recipients):

1. Any recipient with ``tempfail`` → the whole message is tempfailed with that verdict's reply
   (scanner down must never become a silent pass; the MTA retries for everyone).
2. No recipient left to deliver or quarantine → ``reject`` with filterd's code and text when
   some recipient is rejected, else ``discard``.
3. Otherwise recipients whose own outcome is reject or discard are removed (``delrcpt``) and the
   message goes on to the others, with header/subject/body changes applied.
4. Quarantine: ``hold`` puts the whole message into the MTA's hold queue (Postfix ``hold``,
   Sendmail quarantine) — recipients that would have been delivered are held too, so nothing a
   policy wanted held escapes; ``store`` hands the quarantined recipients to filterd's quarantine
   service and removes them from the delivery (or discards the message when none is left).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..rewrite import encode_value
from ..verdict import Action, Verdict

QUARANTINE_MODES = ("auto", "hold", "store", "both")


@dataclass
class MilterPlan:
    """What to do at end of message. ``result`` is one of continue, reject, tempfail, discard
    (``continue`` = let the message through, with the changes below)."""

    result: str = "continue"
    reply: tuple[int, str, str] | None = None
    delete_rcpts: list[str] = field(default_factory=list)
    # (name, value): headers to add, in the order they should appear
    add_headers: list[tuple[str, str]] = field(default_factory=list)
    # (name, 1-based occurrence index, value); value "" deletes that occurrence
    change_headers: list[tuple[str, int, str]] = field(default_factory=list)
    replace_body: bytes | None = None
    hold_reason: str | None = None  # MTA quarantine (Postfix hold queue)
    store_recipients: list[str] = field(default_factory=list)  # filterd quarantine service
    quarantined: list[str] = field(default_factory=list)  # every recipient quarantined (events)
    notes: list[str] = field(default_factory=list)  # for the log line

    def summary(self) -> str:
        parts = [self.result]
        if self.reply:
            parts.append(f"{self.reply[0]} {self.reply[1]}")
        if self.delete_rcpts:
            parts.append("delrcpt=" + ",".join(self.delete_rcpts))
        if self.hold_reason:
            parts.append("hold")
        if self.store_recipients:
            parts.append("stored=" + ",".join(self.store_recipients))
        if self.add_headers:
            parts.append(f"+{len(self.add_headers)}hdr")
        if self.change_headers:
            parts.append(f"~{len(self.change_headers)}hdr")
        if self.replace_body is not None:
            parts.append("body")
        return " ".join(parts + self.notes)


def reply_of(verdict: Verdict) -> tuple[int, str, str]:
    """(code, enhanced, text) with '%' made safe for libmilter's printf-style reply."""
    code, enh, text = verdict.smtp_reply()
    return code, enh, text.replace("%", "%%")


def plan(result, headers: list[tuple[str, str]], quarantine_mode: str = "hold",
         can_replace_body: bool = True) -> MilterPlan:
    """Build the plan for ``result``. ``headers`` are the message's headers as received
    ((name, raw value) pairs, in order) — used to address change/delete by occurrence index.
    ``quarantine_mode`` is ``hold``, ``store`` or ``both`` (``auto`` resolved by the caller)."""
    p = MilterPlan()
    outcomes = result.outcomes
    if not outcomes:
        return p
    by_action: dict[Action, list[str]] = {}
    for addr, o in outcomes.items():
        by_action.setdefault(o.action, []).append(addr)

    tempfails = by_action.get(Action.TEMPFAIL, [])
    if tempfails:
        p.result = "tempfail"
        p.reply = reply_of(outcomes[tempfails[0]].verdict)
        return p

    deliver = [a for a, o in outcomes.items() if o.action.delivers]
    quarantine = by_action.get(Action.QUARANTINE, [])
    rejects = by_action.get(Action.REJECT, [])
    discards = by_action.get(Action.DISCARD, [])

    if not deliver and not quarantine:
        if rejects:
            p.result = "reject"
            p.reply = reply_of(outcomes[rejects[0]].verdict)
        else:
            p.result = "discard"
        return p

    p.delete_rcpts = rejects + discards
    if quarantine:
        p.quarantined = list(quarantine)
        reason = outcomes[quarantine[0]].verdict.reason or "quarantined by filterd"
        if quarantine_mode in ("store", "both"):
            p.store_recipients = list(quarantine)
        if quarantine_mode in ("hold", "both"):
            p.hold_reason = reason
        elif deliver:
            p.delete_rcpts += quarantine  # stored in filterd's quarantine, not delivered
        else:
            p.result = "discard"  # every remaining recipient's copy is in filterd's quarantine
            return p

    _header_changes(p, result.modifications, headers, can_replace_body)
    return p


def _unfold(value: str) -> str:
    return " ".join(value.replace("\r", "").replace("\n", " ").split())


def _header_changes(p: MilterPlan, mods, headers: list[tuple[str, str]],
                    can_replace_body: bool) -> None:
    # occurrence index per header (1-based, per name) of every received header
    occurrences: dict[str, list[tuple[int, str]]] = {}
    for name, value in headers:
        lst = occurrences.setdefault(name.lower(), [])
        lst.append((len(lst) + 1, value))
    deleted: set[tuple[str, int]] = set()
    changed: dict[tuple[str, int], str] = {}

    def first_live(lname: str):
        for idx, value in occurrences.get(lname, []):
            if (lname, idx) not in deleted:
                return idx, changed.get((lname, idx), value)
        return None, None

    for m in mods:
        if m.kind == "add_header":
            p.add_headers.append((m.name, encode_value(m.value)))
        elif m.kind == "remove_header":
            lname = m.name.lower()
            for idx, value in occurrences.get(lname, []):
                if (lname, idx) in deleted:
                    continue
                if not m.value or _unfold(value) == _unfold(m.value):
                    deleted.add((lname, idx))
                    changed.pop((lname, idx), None)
            # headers filterd itself was going to add with that name go too
            p.add_headers = [(n, v) for n, v in p.add_headers
                             if not (n.lower() == lname and (not m.value or v == m.value))]
        elif m.kind in ("change_header", "rewrite_subject"):
            name = "Subject" if m.kind == "rewrite_subject" else m.name
            lname = name.lower()
            idx, old = first_live(lname)
            if m.kind == "rewrite_subject":
                old_s = _unfold(old or "")
                new = (m.value.replace("{subject}", old_s) if "{subject}" in m.value
                       else f"{m.value} {old_s}").strip()
            else:
                new = m.value
            if idx is None:
                p.add_headers.append((name, encode_value(new)))
            else:
                changed[(lname, idx)] = encode_value(new)
        elif m.kind == "replace_body" and m.body is not None:
            if can_replace_body:
                p.replace_body = m.body
            else:
                p.notes.append("body-replacement-skipped(oversize)")

    names = {}
    for name, _ in headers:
        names.setdefault(name.lower(), name)
    for (lname, idx), value in changed.items():
        if (lname, idx) not in deleted:
            p.change_headers.append((names.get(lname, lname), idx, value))
    # deletions last and from the highest index down, so earlier indexes stay valid
    for lname, idx in sorted(deleted, key=lambda k: (k[0], -k[1])):
        p.change_headers.append((names.get(lname, lname), idx, ""))
