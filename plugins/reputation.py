"""Reputation: per client IP, per client network (/24, /64) and per sender domain, built from
past verdicts (ham/spam/virus/rejected counts that decay over time), reported as symbols; and
allow/block lists (global, per recipient domain, per recipient) that win over scores.

When it runs:
- ``data``: one store round trip reads the three standings; REP_{IP,NET,DOMAIN}_{BAD,GOOD}
  symbols are added (weights in rules/50-reputation-scores.toml).
- ``decide``: allow/block lists replace score-based outcomes per recipient (allow: accept;
  block: 550 5.7.1). An allow entry never overrides another plugin's own verdict (a virus
  reject, a scanner tempfail) — only what the score decided.
- ``scanned``: the final outcome is learnt (the event after the data phase; rejected messages
  never reach ``delivered``), written behind every ``learn_flush`` in one round trip. The
  learnt category ignores this plugin's own symbols, so a bad reputation does not feed itself.
"""
from __future__ import annotations

import time

from filterd.hookspecs import hookimpl
from filterd.reputation import ListPolicy, ReputationModel, ip_in, active, guarded, sender_domain
from filterd.verdict import Action, Verdict

CONFIG = """
[reputation]
# Also look up and learn for `filterd check` (front door "check"). Off: a check is a dry run
# that neither reads nor writes shared state. Allow/block lists apply either way.
in_check = false
# Learn from every message's outcome (ham, spam, virus, rejected).
learn = true
# Learnt counts are written behind, all subjects of this interval in one store round trip
# (off the message's path). This node's own lookups see unwritten counts at once; other nodes
# sharing Redis see them at most this much later. "0s" writes each message's counts at once.
learn_flush = "250ms"
# Standings read from the store are kept on this node this long: a sender seen again within it
# costs no read (reputation is statistics over days). This node's own learning is added at
# once; other nodes' shows within this time. "0s" = read for every message.
cache = "10s"
# Clients whose mail is not learnt from (local submissions, your own relays).
skip_networks = ["127.0.0.0/8", "::1/128"]
# Mail from authenticated clients (outbound) is not learnt from.
skip_authenticated = true
# Counts go into time buckets; a bucket's weight halves every half_life; buckets older than
# max_age are dropped.
bucket = "6h"
half_life = "7d"
max_age = "30d"
# The client network a host's reputation also counts for.
ipv4_prefix = 24
ipv6_prefix = 64
# A standing is judged only with at least this many (decayed) messages.
min_messages = 5.0
# Share of bad messages (spam + virus + rejected) from which a subject is bad / up to which good.
bad_ratio = 0.8
good_ratio = 0.1
# Symbols whose presence makes a message count as "virus" (prefix match).
virus_symbols = ["VIRUS", "CLAM_VIRUS"]
# Good sender-domain reputation only counts when one of these symbols says the domain is
# authentic (otherwise anyone could forge a well-liked domain). [] = always count it.
domain_good_requires = ["SPF_PASS", "DKIM_VALID", "DMARC_PASS"]
# Reply for block-listed senders.
block_code = 550
block_enhanced = "5.7.1"
block_text = "Message refused by local policy ({why})"

# Global allow/block lists. IPs: addresses or networks ("192.0.2.0/24").
# Senders: "user@example.com" (exact), "example.com" or "@example.com" (domain and subdomains).
[reputation.lists]
allow_ips = []
block_ips = []
allow_senders = []
block_senders = []

# Per recipient domain, e.g. [reputation.domains."example.com"] allow_senders = ["partner.org"]
[reputation.domains]
"*" = { allow_ips = [], block_ips = [], allow_senders = [], block_senders = [] }

# Per recipient, e.g. [reputation.recipients."ceo@example.com"] block_senders = ["spam.test"]
[reputation.recipients]
"*" = { allow_ips = [], block_ips = [], allow_senders = [], block_senders = [] }
"""

NAME = "reputation"
SCORE_SOURCES = ("score", "pipeline", "")


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.model = ReputationModel(options, services)
        self.lists = ListPolicy(options)

    @hookimpl
    async def shutdown(self):
        if self.model.buffer is not None:  # a clean stop or reload loses no learnt counts
            await self.model.buffer.close()

    async def flush(self) -> None:
        """Write learnt counts still held in the write-behind buffer now."""
        if self.model.buffer is not None:
            await self.model.buffer.flush()

    @hookimpl
    def data(self, ctx, message):
        if not active(ctx, self.options):
            return None  # dry run: no coroutine, no task
        return self._data(ctx)

    async def _data(self, ctx):
        ip = ctx.session.peer_ip
        sender = ctx.transaction.mail_from
        standings = await guarded(ctx, NAME, lambda st: self.model.lookup(st, ip, sender,
                                                                    ctx=ctx))
        if not standings:
            return
        ctx.data["reputation"] = standings
        authentic = not self.options["domain_good_requires"] or any(
            ctx.has_symbol(s) for s in self.options["domain_good_requires"])
        for kind, st in standings.items():
            judged = self.model.judge(st)
            if judged is None or (kind == "domain" and judged == "good" and not authentic):
                continue
            name = f"REP_{kind.upper()}_{judged.upper()}"
            score = {"bad": 2.0, "good": -1.0}[judged]  # rules/50-reputation-scores.toml wins
            ctx.add_symbol(name, score, [st.subject, f"bad={st.bad_ratio:.2f}",
                                         f"n={st.total:.1f}"], st.describe(), source=NAME)
        return

    @hookimpl
    def decide(self, ctx):
        ip = ctx.session.peer_ip
        sender = ctx.transaction.mail_from
        out = {}
        for r in ctx.recipients:
            hit = self.lists.check(ip, sender, r.address)
            if hit is None:
                continue
            ctx.add_symbol("ALLOWLISTED" if hit.kind == "allow" else "BLOCKLISTED", 0.0,
                           [hit.level, hit.entry], hit.describe(), recipient=r.address,
                           source=NAME)
            if hit.kind == "block":
                o = self.options
                out[r.address] = Verdict.reject(o["block_text"].format(why=hit.describe()),
                                                code=o["block_code"],
                                                enhanced=o["block_enhanced"], source=NAME)
            elif r.verdict.source in SCORE_SOURCES or r.verdict.action in (
                    Action.CONTINUE, Action.ACCEPT, Action.ADD_HEADER, Action.REWRITE_SUBJECT):
                out[r.address] = Verdict.accept(hit.describe(), source=NAME)
        return out or None

    # -- learning ----------------------------------------------------------------------------
    def category(self, ctx) -> str | None:
        """What this message counts as, from its outcome without our own symbols."""
        prefixes = tuple(self.options["virus_symbols"])
        if any(s.name.startswith(prefixes) for s in ctx.all_symbols()):
            return "virus"
        own = sum(s.score for s in ctx.symbols if s.source == NAME)
        worst = None
        for r in ctx.recipients:
            if r.verdict.source == NAME:  # allow/block-listed: says nothing about reputation
                continue
            if r.verdict.source not in SCORE_SOURCES:
                action = r.verdict.action
            else:
                action = ctx.pipeline.policy.action_for(ctx.score_for(r.address) - own, r.address)
            if worst is None or action.severity > worst.severity:
                worst = action
        if worst is None or worst is Action.TEMPFAIL:
            return None
        if worst is Action.REJECT:
            return "rejected"
        if worst in (Action.ACCEPT, Action.CONTINUE):
            return "ham"
        return "spam"

    @hookimpl
    def scanned(self, ctx, result):
        o = self.options
        if not o["learn"] or not active(ctx, o):
            return None
        if o["skip_authenticated"] and ctx.session.auth_user:
            return None
        if ip_in(ctx.session.peer_ip, o["skip_networks"]):
            return None
        cat = self.category(ctx)
        if cat is None:
            return None
        ip, sender = ctx.session.peer_ip, ctx.transaction.mail_from
        return guarded(ctx, NAME, lambda st: self.model.record(st, ip, sender, cat, time.time()))


__all__ = ["CONFIG", "Plugin", "sender_domain"]
