"""DNS block lists: the client IP against DNSBL zones, the sender domains (envelope and From:)
against RHSBL zones, and the domains of URLs in the body against URIBL zones — through the
configured resolver (``services.dns``; fixture DNS in tests), with answers cached in the store so
several gateways share them. Each zone maps return codes to symbols; symbol weights come from
``[scores]`` (defaults for the example zones in rules/50-reputation-scores.toml).

No zone is configured by default: public lists have usage terms (Spamhaus wants a DQS key for
most resolvers) and a gateway without internet access would only wait for timeouts. A failed
lookup adds DNSBL_FAIL (score 0) and never defers mail.

Return-code keys: an exact address ("127.0.0.2"), a bitmask on the last octet ("&4", for
multi-lists such as URIBL/SURBL), or "*" for any other 127.0.0.0/8 answer. Answers in
127.255.255.0/24 are the list's error codes (query refused, quota) and are logged, never scored.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging

from filterd.auth import public_suffix_list
from filterd.dns import DNSError
from filterd.hookspecs import hookimpl
from filterd.reputation import active, guarded, ip_in, parse_ip, sender_domain

log = logging.getLogger("filterd.plugins.dnsbl")

CONFIG = """
[dnsbl]
# Use the store for the answer cache also for `filterd check`; off: check queries DNS only.
in_check = false
# How long answers are cached in the store (listed / not listed).
cache_ttl = "10m"
negative_cache_ttl = "5m"
# Check client IPs in private, loopback, link-local and CGNAT ranges too (normally pointless).
check_private = false
# At most this many URL domains per message are looked up.
max_uri_domains = 20
# Check the domain of the From: header against RHSBL zones too (not only the envelope sender).
check_from_header = true

# Zone -> { return code -> symbol }. Example:
#   [dnsbl.ip_zones."zen.spamhaus.org"]
#   "127.0.0.2" = "RBL_SPAMHAUS_SBL"
#   "127.0.0.3" = "RBL_SPAMHAUS_CSS"
#   "127.0.0.4" = "RBL_SPAMHAUS_XBL"
#   "127.0.0.10" = "RBL_SPAMHAUS_PBL"
[dnsbl.ip_zones]
"*" = { "*" = "" }

# Sender domains, e.g. [dnsbl.rhsbl_zones."dbl.spamhaus.org"] "127.0.1.2" = "DBL_SPAM"
[dnsbl.rhsbl_zones]
"*" = { "*" = "" }

# URL domains (registered domain, and the reversed IP for numeric URLs), e.g.
#   [dnsbl.uribl_zones."multi.uribl.com"]
#   "&2" = "URIBL_BLACK"
#   "&4" = "URIBL_GREY"
#   "&8" = "URIBL_RED"
[dnsbl.uribl_zones]
"*" = { "*" = "" }
"""

NAME = "dnsbl"
# Addresses no public list knows about: private, loopback, link-local, shared (CGNAT), ULA.
LOCAL_NETWORKS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8",
                  "169.254.0.0/16", "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10"]


def reversed_ip(ip: str) -> str | None:
    addr = parse_ip(ip)
    if addr is None:
        return None
    if addr.version == 4:
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def symbols_for(codes: dict, answers: list[str]) -> list[tuple[str, str]]:
    """[(symbol, answer)] for the answers of one zone through its code table."""
    out = []
    for a in answers:
        try:
            addr = ipaddress.ip_address(a)
        except ValueError:
            continue
        if addr.version != 4 or not str(addr).startswith("127."):
            continue
        if str(addr).startswith("127.255.255."):
            log.warning("DNSBL answered %s (an error code of the list: query refused or quota "
                        "exceeded); not scored", a)
            continue
        found = False
        if codes.get(a):
            out.append((codes[a], a))
            found = True
        last = int(str(addr).rsplit(".", 1)[1])
        for key, sym in codes.items():
            if key.startswith("&") and sym and key[1:].isdigit() and last & int(key[1:]):
                out.append((sym, a))
                found = True
        if not found and codes.get("*"):
            out.append((codes["*"], a))
    return out


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services

    def idle_hooks(self) -> set[str]:
        o = self.options
        return set() if (o["ip_zones"] or o["rhsbl_zones"] or o["uribl_zones"]) else {"data"}

    @hookimpl
    def startup(self, options, services):
        if options["uribl_zones"]:  # (the only look-ups by registered domain)
            public_suffix_list()  # loaded now, not on the first message

    def registered_domain(self, host: str) -> str:
        return public_suffix_list().privatesuffix(host.lower().rstrip(".")) or ""

    async def _lookup(self, ctx, zone: str, query: str) -> list[str] | None:
        """Answers for query.zone (A records), cached in the store; None on DNS failure."""
        from filterd.config import parse_duration

        name = f"{query}.{zone}"
        use_store = active(ctx, self.options)
        key = f"dnsbl:{name}"
        if use_store:
            cached = await guarded(ctx, NAME, lambda st: st.get(key))
            if cached is not None:
                return [a for a in cached.decode().split(",") if a]
        try:
            ans = await ctx.services.dns.query(name, "A")
        except DNSError as exc:
            ctx.add_symbol("DNSBL_FAIL", 0.0, [zone], f"lookup of {name} failed: {exc}",
                           source=NAME)
            return None
        answers = list(ans.records)
        if use_store:
            ttl = parse_duration(self.options["cache_ttl" if answers else "negative_cache_ttl"])
            await guarded(ctx, NAME, lambda st: st.set(key, ",".join(answers), ttl=ttl))
        return answers

    async def _check(self, ctx, zones: dict, queries: list[tuple[str, str]], what: str):
        """queries: [(query name prefix, what it is for the symbol's options)]."""
        jobs = [(zone, codes, q, label) for zone, codes in zones.items()
                for q, label in queries]
        results = await asyncio.gather(*[self._lookup(ctx, z, q) for z, _, q, _ in jobs])
        for (zone, codes, q, label), answers in zip(jobs, results):
            for sym, a in symbols_for(codes or {}, answers or []):
                ctx.add_symbol(sym, None, [label, a], f"{what} {label} listed in {zone} ({a})",
                               source=NAME)

    @hookimpl
    def data(self, ctx, message):
        o = self.options
        if not (o["ip_zones"] or o["rhsbl_zones"] or o["uribl_zones"]):
            return None  # nothing configured: no coroutine, no task
        return self._data(ctx, message)

    async def _data(self, ctx, message):
        o = self.options
        jobs = []
        if o["ip_zones"]:
            ip = ctx.session.peer_ip
            rev = reversed_ip(ip)
            private = ip_in(ip, LOCAL_NETWORKS) is not None
            if rev and (o["check_private"] or not private):
                jobs.append(self._check(ctx, o["ip_zones"], [(rev, ip)], "client IP"))
        if o["rhsbl_zones"]:
            doms = {sender_domain(ctx.transaction.mail_from)}
            if o["check_from_header"]:
                import email.utils

                for _, addr in email.utils.getaddresses(
                        [v for n, v in message.parsed.headers if n.lower() == "from"]):
                    doms.add(sender_domain(addr))
            doms.discard("")
            if doms:
                jobs.append(self._check(ctx, o["rhsbl_zones"], [(d, d) for d in sorted(doms)],
                                        "sender domain"))
        if o["uribl_zones"]:
            queries: dict[str, str] = {}
            for host in message.parsed.url_hosts:
                rev = reversed_ip(host)
                q = rev if rev else self.registered_domain(host)
                if q:
                    queries.setdefault(q, host)
                if len(queries) >= int(o["max_uri_domains"]):
                    break
            if queries:
                jobs.append(self._check(ctx, o["uribl_zones"], list(queries.items()), "URL"))
        if jobs:
            await asyncio.gather(*jobs)
