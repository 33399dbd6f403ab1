"""Aliases and distribution lists: rewrites recipients at RCPT time, before any content policy,
so every final recipient gets its own outcome. Postfix aliases(5) files, TOML maps, inline
maps, virtual alias domains, catch-all, plus-addressing, static distribution lists with an
optional members-only posting rule."""
from __future__ import annotations

import logging

from filterd.aliases import AliasMap, load_alias_map
from filterd.hookspecs import hookimpl
from filterd.model import Recipient
from filterd.verdict import Verdict

log = logging.getLogger("filterd.aliases")

CONFIG = """
# Alias file in Postfix aliases(5) syntax ("name: target, target"; ":include:/path" works;
# "|command" and "/file" targets are refused). "" = none.
file = ""
# Alias map in TOML: "sales@example.com" = ["ann@example.com", "bob@example.com"]
toml_file = ""
# Domains the unqualified names of `file` apply to; [] = every domain.
domains = []
# Virtual alias domains: addresses there exist only as aliases; any other gets 550 5.1.1.
virtual_domains = []
# Plus-addressing: user+tag@example.com expands like user@example.com ("" = off).
plus_separator = "+"
# Recursive expansion limits.
max_depth = 10
max_recipients = 1000

# Inline aliases: "postmaster@example.com" = ["ann@example.com"]
[aliases.map]
"*" = [""]

# Catch-all per domain: mail for an address of that domain that is no alias goes here.
[aliases.catch_all]
"*" = ""

# Distribution lists, expanded per message with duplicates removed:
#   [aliases.lists."staff@example.com"]
#   members = ["ann@example.com", "bob@example.com"]
#   members_file = "/etc/filterd/lists/staff.txt"   # one address a line
#   members_only = true                               # only members may post
[aliases.lists."*"]
members = [""]
members_file = ""
members_only = false
"""


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.map: AliasMap | None = None
        self.virtual = {d.lower() for d in options.get("virtual_domains") or []}
        self.lists = {k.lower(): v for k, v in (options.get("lists") or {}).items()}

    @hookimpl
    def startup(self, options):
        self.map = load_alias_map(options)  # a broken alias file stops start-up, named

    def idle_hooks(self) -> set[str]:
        # the map is read at start-up (a reload starts afresh): with nothing in it, every
        # address passes through unchanged and RCPT TO has nothing to do
        return set() if self.wants("rcpt_to") else {"rcpt_to"}

    def wants(self, hook, session=None, address=None) -> bool:
        """RCPT TO only for an address this plugin expands or refuses: a list, an alias, a
        catch-all or virtual domain (everything else passes through unchanged)."""
        if hook != "rcpt_to" or self.map is None:
            return True
        if address is None:
            return bool(self.lists or self.virtual or self.map.entries or self.map.unqualified
                        or self.map.catch_all)
        key = address.lower()
        domain = key.rpartition("@")[2]
        return (key in self.lists or domain in self.virtual or domain in self.map.catch_all
                or self.map.is_alias(address))

    @hookimpl
    def rcpt_to(self, ctx, recipient):
        addr = recipient.address
        key = addr.lower()
        spec = self.lists.get(key)
        if spec and spec.get("members_only"):
            members = {m.lower() for m in self.map.expand(addr).recipients}
            if ctx.transaction.mail_from.lower() not in members:
                return Verdict.reject(f"Only members of <{addr}> may post to it", code=550,
                                      enhanced="5.7.1")
        exp = self.map.expand(addr)
        for loop in exp.loops:
            log.warning("alias loop ignored while expanding <%s>: %s", addr, loop)
        if exp.too_deep:
            log.error("alias expansion of <%s> deeper than %d levels", addr, self.map.max_depth)
            return Verdict.tempfail(f"Alias expansion of <{addr}> is too deep; "
                                    "the postmaster has been told", code=451, enhanced="4.3.0")
        if exp.truncated:
            log.error("alias expansion of <%s> exceeds %d recipients", addr,
                      self.map.max_recipients)
            return Verdict.tempfail(f"Alias expansion of <{addr}> has too many recipients",
                                    code=451, enhanced="4.3.0")
        final = exp.recipients
        if final == [addr]:
            if recipient.domain in self.virtual and not self.map.is_alias(addr):
                return Verdict.reject(f"No such user <{addr}>", code=550, enhanced="5.1.1")
            return None
        if not final:
            return Verdict.reject(f"<{addr}> expands to no recipient", code=550, enhanced="5.1.1")
        existing = {r.address.lower() for r in ctx.transaction.recipients}
        # targets already among the recipients are not added twice (the pipeline skips a
        # recipient whose address is already present)
        first, *rest = [a for a in final if a.lower() not in existing] or [final[0]]
        recipient.original = recipient.original or addr
        recipient.address = first
        for a in rest:
            ctx.transaction.recipients.append(Recipient(a, dict(recipient.params), original=addr))
        return None
