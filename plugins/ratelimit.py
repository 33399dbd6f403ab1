"""Rate limits over sliding windows, shared between gateways through the store: per client IP
and per envelope sender (inbound, counted per message at MAIL FROM) and per authenticated user
(outbound, counted per recipient at RCPT TO, so a compromised account cannot send one message to
thousands of recipients either). A refused attempt is not counted: a client hammering the limit
gets through again as soon as its window has room. When both the IP and the sender limit apply,
both windows are checked (and counted) in one store round trip.

Store down: the limit is not enforced for that message (STORE_UNAVAILABLE symbol), never a
tempfail for everyone; with [store.redis_down] mode = "fallback" each node enforces it on its own.
"""
from __future__ import annotations

import time

from filterd.hookspecs import hookimpl
from filterd.reputation import ip_in, active, guarded
from filterd.verdict import Verdict

_LIMIT = """
# {what}: at most `limit` {unit} per `window` (sliding); 0 = no limit.
limit = {limit}
window = "{window}"
# What happens over the limit, and the reply. {{limit}}, {{window}} and {{subject}} are filled in.
action = "{action}"  # one of: tempfail, reject
code = {code}
enhanced = "{enhanced}"
text = "{text}"
"""

CONFIG = """
[ratelimit]
# Also count `filterd check` runs (front door "check"); off: a check is a dry run.
in_check = false
# Clients exempt from the per-IP and per-sender limits.
exempt_networks = ["127.0.0.0/8", "::1/128"]
[ratelimit.ip]""" + _LIMIT.format(
    what="Per client IP (unauthenticated clients)", unit="messages", limit=300, window="1m",
    action="tempfail", code=451, enhanced="4.7.1",
    text="Too many messages from {subject} (more than {limit} per {window}); slow down and "
         "retry later") + """
[ratelimit.sender]""" + _LIMIT.format(
    what="Per envelope sender (unauthenticated clients; the null sender is not counted)",
    unit="messages", limit=100, window="1m", action="tempfail", code=451, enhanced="4.7.1",
    text="Too many messages from sender {subject} (more than {limit} per {window}); retry "
         "later") + """
[ratelimit.user]""" + _LIMIT.format(
    what="Per authenticated user (outbound), counted per recipient", unit="recipients",
    limit=500, window="1h", action="tempfail", code=450, enhanced="4.7.1",
    text="Sending limit reached for {subject} ({limit} recipients per {window}); contact "
         "your administrator if this is legitimate") + """
"""

NAME = "ratelimit"


class Plugin:
    def __init__(self, options, services):
        self.options = options

    def wants(self, hook, session=None, address=None) -> bool:
        """MAIL FROM: unauthenticated clients outside ``exempt_networks`` (a limit on IP or
        sender); RCPT TO: authenticated users (the per-user limit)."""
        o = self.options
        if hook == "mail_from":
            if not (int(o["ip"]["limit"]) or int(o["sender"]["limit"])):
                return False
            return session is None or not (session.auth_user
                                           or ip_in(session.peer_ip, o["exempt_networks"]))
        if hook == "rcpt_to":
            return bool(int(o["user"]["limit"])) and (session is None or bool(session.auth_user))
        return True

    def _reply(self, kind: str, subject: str) -> Verdict:
        o = self.options[kind]
        text = o["text"].format(limit=o["limit"], window=o["window"], subject=subject)
        if o["action"] == "reject":
            return Verdict.reject(text, code=int(o["code"]), enhanced=o["enhanced"], source=NAME)
        return Verdict.tempfail(text, code=int(o["code"]), enhanced=o["enhanced"], source=NAME)

    async def _hit(self, ctx, checks: list[tuple[str, str]]) -> Verdict | None:
        """checks: [(kind, subject)], looked up in one store round trip."""
        from filterd.config import parse_duration

        todo = [(kind, subject) for kind, subject in checks
                if int(self.options[kind]["limit"]) and subject]
        if not todo:
            return None
        now = time.time()
        items = [(f"rl:{kind}:{subject.lower()}", parse_duration(self.options[kind]["window"]),
                  now, int(self.options[kind]["limit"]), 1) for kind, subject in todo]
        res = await guarded(ctx, NAME, lambda st: st.window_check_many(items))
        for (kind, subject), r in zip(todo, res or []):
            if not r[1]:
                ctx.add_symbol("RATELIMITED", 0.0, [kind, subject],
                               f"{kind} rate limit exceeded", source=NAME)
                return self._reply(kind, subject)
        return None

    @hookimpl
    def mail_from(self, ctx, sender):
        if not active(ctx, self.options) or ctx.session.auth_user:
            return None
        ip = ctx.session.peer_ip
        if ip_in(ip, self.options["exempt_networks"]):
            return None
        return self._hit(ctx, [("ip", ip), ("sender", sender)])

    @hookimpl
    def rcpt_to(self, ctx, recipient):
        # plain function: returns None at once for unauthenticated clients (no task, no await)
        # and a coroutine (awaited by the host) when there is a limit to check
        if not active(ctx, self.options) or not ctx.session.auth_user:
            return None
        return self._hit(ctx, [("user", ctx.session.auth_user)])
