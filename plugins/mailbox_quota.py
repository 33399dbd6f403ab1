"""Mailbox quotas at SMTP time: a local recipient whose mailbox is full gets 452 4.2.2 at
RCPT (the sender retries later); one whose quota is smaller than the message gets 552 5.2.2
after DATA. Only for [delivery] local_domains; delivery itself checks again."""
from __future__ import annotations

from filterd.hookspecs import hookimpl
from filterd.mailstore import MailStore, QuotaExceeded
from filterd.verdict import Verdict

CONFIG = """
# Check mailbox quotas while the client is still connected (recommended).
check_at_smtp_time = true
"""


class Plugin:
    def __init__(self, options, services):
        self.options = options
        cfg = services.config
        self.local = {d.lower() for d in cfg.get("delivery.local_domains") or []}
        self.store = MailStore.from_config(cfg) if self.local else None

    def _applies(self, address: str) -> bool:
        return bool(self.store) and self.options.get("check_at_smtp_time", True) and \
            address.rpartition("@")[2].lower() in self.local

    def idle_hooks(self) -> set[str]:
        # no local domains (or no check at SMTP time): nothing to check for anyone
        if self.store and self.options.get("check_at_smtp_time", True) and self.local:
            return set()
        return {"rcpt_to", "data"}

    def wants(self, hook, session=None, address=None) -> bool:
        if hook != "rcpt_to":
            return True
        if address is None:
            return bool(self.store) and bool(self.options.get("check_at_smtp_time", True)) \
                and bool(self.local)
        return self._applies(address)

    @hookimpl
    def rcpt_to(self, recipient):
        if not self._applies(recipient.address):
            return None
        try:
            self.store.check_quota(recipient.address, 1)
        except QuotaExceeded as exc:
            code, enh = exc.smtp
            return Verdict.tempfail(f"Mailbox of <{recipient.address}> is full", code=code,
                                    enhanced=enh)
        return None

    @hookimpl
    def data(self, ctx, message):
        out = {}
        for r in ctx.recipients:
            if not self._applies(r.address):
                continue
            try:
                self.store.check_quota(r.address, message.size)
            except QuotaExceeded as exc:
                code, enh = exc.smtp
                make = Verdict.reject if exc.permanent else Verdict.tempfail
                out[r.address] = make(f"Mailbox of <{r.address}>: {exc}", code=code, enhanced=enh)
        return out or None
