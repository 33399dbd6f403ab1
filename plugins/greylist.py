"""Greylisting: the first message of an unknown (client network, sender, recipient) triplet is
deferred with a 4xx; a retry after ``delay`` and within ``retry_window`` passes, and the
triplet stays allowed for ``pass_ttl``. After ``auto_allow_after`` successful retries from one
client network, that network skips greylisting altogether for ``auto_allow_ttl``.

Stage: RCPT TO. The triplet is complete there; deferring at RCPT costs the client no DATA
transfer, and it defers only the recipients concerned (others in the same transaction go
through). Greylisting after DATA could use the content score, but every deferred message would be
transferred twice.

Skipped for authenticated clients, allow-listed senders/clients (the [reputation] lists, with
the same per-domain and per-recipient levels), clients with good reputation (REP_IP_GOOD /
REP_NET_GOOD standing) and ``skip_networks``. With Redis shared by several gateways, a retry
at another node passes (state lives in the store). Store down: see [store.redis_down] — never a
deferral because the store failed.
"""
from __future__ import annotations

import hashlib
import json
import re
import time

from filterd.hookspecs import hookimpl
from filterd.reputation import (ExpiringMap, ListPolicy, ReputationModel, active,
                                client_network, guarded, ip_in)
from filterd.verdict import Verdict

CONFIG = """
# Greylisting is a policy choice (it delays the first mail of every new sender): off by default.
enabled = false
# Also greylist for `filterd check` (front door "check"); off: a check is a dry run.
in_check = false
# A retry passes once this long after the first attempt...
delay = "5m"
# ...and no later than this (after that the triplet starts over).
retry_window = "2d"
# How long a passed triplet stays allowed (refreshed by each message).
pass_ttl = "36d"
# After this many successful retries from one client network, the network is allowed outright
# (0 = never).
auto_allow_after = 3
auto_allow_ttl = "30d"
# The client network of the triplet: hosts of one network retry from different addresses.
ipv4_prefix = 24
ipv6_prefix = 64
# Clients never greylisted (your own networks, relays).
skip_networks = ["127.0.0.0/8", "::1/128"]
# Skip clients whose IP or network has good reputation (see [reputation]).
skip_good_reputation = true
# A triplet that passed is remembered on this node this long, so its next messages cost no
# store lookup ("0s" = ask the store every time). Passing is permanent for pass_ttl anyway;
# only a manual deletion of the triplet in the store takes this long to be noticed here.
local_cache = "60s"
# The reply. {delay} is the remaining wait in seconds.
code = 451
enhanced = "4.7.1"
text = "Greylisted: this is a temporary deferral, please retry in {delay} seconds"
"""

NAME = "greylist"
# A passed triplet's expiry is pushed back at most once a day (not a write per message).
REFRESH = 86400.0
_BATV = re.compile(r"^(prvs|btv1|msprvs1)=[^=]+=(.+)$", re.IGNORECASE)


def normalize_sender(sender: str) -> str:
    """Lowercase; BATV-style tags (prvs=TAG=user@dom) change per message, so they are removed."""
    s = sender.lower()
    local, _, dom = s.rpartition("@")
    m = _BATV.match(local)
    return f"{m.group(2)}@{dom}" if m and dom else s


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.delay = _d(options["delay"])
        self.window = _d(options["retry_window"])
        self.pass_ttl = _d(options["pass_ttl"])
        self.auto_ttl = _d(options["auto_allow_ttl"])
        rep = services.config.section("reputation") or {}
        self.lists = ListPolicy(rep)
        self.model = ReputationModel(rep, services)
        self.local_ttl = _d(options.get("local_cache") or "0s")
        self.passed = ExpiringMap(200_000)  # triplet keys that passed, this node only

    def _good(self, subj: dict, rows: list) -> bool:
        st = self.model.standings(subj, rows, time.time())
        return any(self.model.judge(st[k]) == "good" for k in ("ip", "net") if k in st)

    def _remember_pass(self, key: str) -> None:
        if self.local_ttl > 0:
            self.passed.put(key, True, self.local_ttl)

    def triplet_key(self, ip: str, sender: str, rcpt: str) -> tuple[str, str]:
        net = client_network(ip, int(self.options["ipv4_prefix"]),
                             int(self.options["ipv6_prefix"]))
        raw = f"{net}|{normalize_sender(sender)}|{rcpt.lower()}"
        return f"grey:t:{hashlib.sha1(raw.encode()).hexdigest()}", f"grey:net:{net}"

    def wants(self, hook, session=None, address=None) -> bool:
        if hook != "rcpt_to" or session is None:
            return True
        return not (session.auth_user or ip_in(session.peer_ip, self.options["skip_networks"]))

    @hookimpl
    def rcpt_to(self, ctx, recipient):
        o = self.options
        if not active(ctx, o) or ctx.session.auth_user:
            return None
        ip, sender = ctx.session.peer_ip, ctx.transaction.mail_from
        if ip_in(ip, o["skip_networks"]):
            return None
        hit = self.lists.check(ip, sender, recipient.address)
        if hit is not None and hit.kind == "allow":
            return None
        return self._rcpt_to(ctx, recipient, ip, sender)

    async def _rcpt_to(self, ctx, recipient, ip, sender):
        o = self.options
        key, net_key = self.triplet_key(ip, sender, recipient.address)

        if self.passed.get(key):
            return None  # passed before, remembered on this node: no store lookup

        async def check(store):
            # one round trip: the triplet, the network's auto-allow counter and the reputation
            # rows (kept in ctx.data for the reputation plugin's data hook; rows this node read
            # recently come from its [reputation] cache)
            subj = self.model.subjects(ip, sender)
            keys = list(subj.values())
            rows = self.model.cached_rows(keys)
            cached = rows is not None
            if cached and o["skip_good_reputation"] and self._good(subj, rows):
                ctx.data.setdefault("rep_rows", {}).update(zip(keys, rows))
                return "reputation"  # known good from this node's cache: no store lookup
            if cached:
                (rec_raw, auto_raw), _ = await store.fetch([key, net_key])
            else:
                (rec_raw, auto_raw), rows = await store.fetch([key, net_key], keys)
                self.model.cache_rows(keys, rows)
            ctx.data.setdefault("rep_rows", {}).update(zip(keys, rows))
            auto = int(o["auto_allow_after"])
            if auto and int(auto_raw or 0) >= auto:
                return "auto"
            # (cached rows were judged above already)
            if not cached and o["skip_good_reputation"] and self._good(subj, rows):
                return "reputation"
            now = time.time()
            rec = json.loads(rec_raw) if rec_raw else None
            if rec is None:
                await store.set_json(key, {"first": now}, ttl=self.window)
                return self.delay
            if rec.get("passed"):
                if now - rec.get("seen", rec["passed"]) > REFRESH:
                    rec["seen"] = now  # keep it alive for pass_ttl after the last message
                    await store.set_json(key, rec, ttl=self.pass_ttl)
                return "known"
            wait = rec["first"] + self.delay - now
            if wait > 0:
                return wait
            await store.set_json(key, {"first": rec["first"], "passed": now, "seen": now},
                                 ttl=self.pass_ttl)
            if auto:
                await store.incr(net_key, 1, ttl=self.auto_ttl)
            return "retried"

        result = await guarded(ctx, NAME, check)
        if result is None:
            return None  # store unavailable: never defer because of it
        if isinstance(result, str):
            if result in ("known", "retried"):
                self._remember_pass(key)
            if result == "retried":
                ctx.add_symbol("GREYLIST_PASSED", 0.0, [recipient.address],
                               "greylisting: retried after the delay", source=NAME)
            return None
        return Verdict.tempfail(o["text"].format(delay=max(int(result + 0.999), 1)),
                                code=int(o["code"]), enhanced=o["enhanced"], source=NAME)


def _d(v) -> float:
    from filterd.config import parse_duration

    return parse_duration(v)
