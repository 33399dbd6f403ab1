"""Shared logic of the store-backed policy plugins (reputation, greylist, rate limit, DNSBL):
client networks, allow/block lists, the reputation model, and the "store down" guard.

The plugins live in ``plugins/``; they import this module so the greylist can ask "is this
sender allow-listed / of good reputation?" exactly the way the reputation plugin decides it.
"""
from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import time
from dataclasses import dataclass

from .model import parse_address
from .store import StoreError, StoreUnavailable

log = logging.getLogger("filterd.reputation")

# Outcome categories counted per IP, network and sender domain.
CATEGORIES = ("ham", "spam", "virus", "rejected")


# -- networks --------------------------------------------------------------------------------------
# Parsing addresses and networks with ipaddress is slow next to a Redis round trip; every message
# asks the same few questions (its client, the configured networks), so the answers are cached.
@functools.lru_cache(maxsize=16384)
def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address (an IPv4-mapped IPv6 address as IPv4), or None when unparsable."""
    addr = parse_address(ip)
    if addr is None:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)
def parse_network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """A configured network (CIDR or address), parsed once; None when it is not one."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=16384)
def client_network(ip: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """``192.0.2.0/24`` for ``192.0.2.7``; ``2001:db8:1:2::/64`` for an IPv6 address. An
    IPv4-mapped IPv6 address counts as IPv4. Unparsable input is returned unchanged."""
    addr = parse_ip(ip)
    if addr is None:
        return ip
    prefix = v4_prefix if addr.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def ip_in(ip: str, entries: list[str]) -> str | None:
    if not entries:
        return None
    addr = parse_ip(ip)
    if addr is None:
        return None
    for e in entries:
        net = parse_network(e)
        if net is not None and addr.version == net.version and addr in net:
            return e
    return None


def sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2].lower().rstrip(".") if "@" in sender else ""


def _sender_in(sender: str, entries: list[str]) -> str | None:
    """Entries: ``user@example.com`` (exact), ``@example.com`` or ``example.com`` (the domain
    and its subdomains)."""
    s = sender.lower()
    dom = sender_domain(s)
    for e in entries:
        e = e.lower().strip()
        if not e:
            continue
        if "@" in e and not e.startswith("@"):
            if s == e:
                return e
            continue
        d = e.lstrip("@")
        if dom and (dom == d or dom.endswith("." + d)):
            return e
    return None


# -- allow/block lists -----------------------------------------------------------------------------
@dataclass
class ListHit:
    kind: str  # "allow" or "block"
    level: str  # "global", "domain <d>", "recipient <r>"
    entry: str  # the list entry that matched

    def describe(self) -> str:
        return f"{self.kind}-listed ({self.level}: {self.entry})"


class ListPolicy:
    """Allow/block lists: global, per recipient domain, per recipient. The most specific level
    with a match decides (recipient, then domain, then global); within one level a block entry
    wins over an allow entry."""

    def __init__(self, options: dict):
        lists = options.get("lists") or {}
        self.global_ = lists
        self.domains = {k.lower(): v for k, v in (options.get("domains") or {}).items()}
        self.recipients = {k.lower(): v for k, v in (options.get("recipients") or {}).items()}

    @staticmethod
    def _match(table: dict, ip: str, sender: str) -> tuple[str, str] | None:
        for kind in ("block", "allow"):
            hit = ip_in(ip, table.get(f"{kind}_ips") or [])
            if hit is None and sender:
                hit = _sender_in(sender, table.get(f"{kind}_senders") or [])
            if hit is not None:
                return kind, hit
        return None

    def check(self, ip: str, sender: str, recipient: str | None = None) -> ListHit | None:
        levels = []
        if recipient:
            r = recipient.lower()
            if r in self.recipients:
                levels.append((f"recipient {r}", self.recipients[r]))
            d = r.rpartition("@")[2]
            if d in self.domains:
                levels.append((f"domain {d}", self.domains[d]))
        levels.append(("global", self.global_))
        for level, table in levels:
            m = self._match(table, ip, sender)
            if m:
                return ListHit(m[0], level, m[1])
        return None


# -- the reputation model ----------------------------------------------------------------------
@dataclass
class Standing:
    """The decayed counts of one subject (IP, network or sender domain)."""

    subject: str
    counts: dict[str, float]

    @property
    def bad(self) -> float:
        c = self.counts
        return c.get("spam", 0) + c.get("virus", 0) + c.get("rejected", 0)

    @property
    def total(self) -> float:
        return self.bad + self.counts.get("ham", 0)

    @property
    def bad_ratio(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def describe(self) -> str:
        c = self.counts
        return (f"{self.subject}: ham={c.get('ham', 0):.1f} spam={c.get('spam', 0):.1f} "
                f"virus={c.get('virus', 0):.1f} rejected={c.get('rejected', 0):.1f}")


class ReputationModel:
    """Counts per subject in time buckets (``<category>:<bucket number>`` fields of one hash per
    subject); a bucket's weight halves every ``half_life``; buckets older than ``max_age`` are
    ignored and pruned. One round trip reads the three subjects of a message; one writes them."""

    def __init__(self, options: dict, services=None):
        from .config import parse_duration

        # one buffer per pipeline, shared by every plugin that reads standings (reputation,
        # greylist), so what this node learnt but has not written yet is seen by all of them
        flush = parse_duration(options.get("learn_flush", "0s"))
        cache = parse_duration(options.get("cache", "0s"))
        self.buffer: LearnBuffer | None = None
        self.rows: RowCache | None = None
        if services is not None and cache > 0:
            self.rows = services.extra.setdefault("reputation.row_cache", RowCache(cache))
        if services is not None and flush > 0:
            self.buffer = services.extra.setdefault("reputation.learn_buffer",
                                                    LearnBuffer(flush, self.rows))
        self.bucket = max(parse_duration(options.get("bucket", "6h")), 1.0)
        self.half_life = max(parse_duration(options.get("half_life", "7d")), 1.0)
        self.max_age = parse_duration(options.get("max_age", "30d"))
        self.v4 = int(options.get("ipv4_prefix", 24))
        self.v6 = int(options.get("ipv6_prefix", 64))
        self.min_messages = float(options.get("min_messages", 5))
        self.bad_ratio = float(options.get("bad_ratio", 0.8))
        self.good_ratio = float(options.get("good_ratio", 0.1))

    def subjects(self, ip: str, sender: str) -> dict[str, str]:
        """{kind: store key} for kinds ip, net, domain (domain only with a sender domain)."""
        out = {}
        if ip:
            out["ip"] = f"rep:ip:{ip}"
            net = client_network(ip, self.v4, self.v6)
            if net != ip:
                out["net"] = f"rep:net:{net}"
        dom = sender_domain(sender)
        if dom:
            out["domain"] = f"rep:dom:{dom}"
        return out

    def decay(self, fields: dict[str, int], now: float) -> dict[str, float]:
        cur = int(now // self.bucket)
        out: dict[str, float] = {}
        for f, n in fields.items():
            cat, _, b = f.partition(":")
            if not b.isdigit():
                continue
            age = (cur - int(b)) * self.bucket
            if age > self.max_age:
                continue
            out[cat] = out.get(cat, 0.0) + n * math.pow(0.5, max(age, 0) / self.half_life)
        return out

    def standings(self, subj: dict[str, str], rows: list[dict[str, int]], now: float
                  ) -> dict[str, Standing]:
        buf = self.buffer
        return {kind: Standing(key.split(":", 2)[2],
                               self.decay(buf.merged(key, row) if buf else row, now))
                for (kind, key), row in zip(subj.items(), rows)}

    async def lookup(self, store, ip: str, sender: str, now: float | None = None,
                     ctx=None) -> dict[str, Standing]:
        """The standings of the message's subjects. With ``ctx``, rows another plugin already
        fetched in this transaction (``ctx.data["rep_rows"]``, e.g. the greylist at RCPT) are
        reused instead of asking the store again."""
        now = time.time() if now is None else now
        subj = self.subjects(ip, sender)
        keys = list(subj.values())
        cache = ctx.data.setdefault("rep_rows", {}) if ctx is not None else {}
        fresh = False
        if all(k in cache for k in keys):
            rows = [cache[k] for k in keys]
        else:
            rows = self.cached_rows(keys)
            if rows is None:
                rows = await store.mhgetall(keys)
                self.cache_rows(keys, rows)
                fresh = True
            cache.update(zip(keys, rows))
        cur = int(now // self.bucket)
        for key, row in zip(keys, rows if fresh else ()):
            stale = [f for f in row if f.partition(":")[2].isdigit()
                     and (cur - int(f.partition(":")[2])) * self.bucket > self.max_age]
            if stale:  # prune buckets past max_age (a busy subject's hash never expires)
                await store.hdel(key, *stale)
        return self.standings(subj, rows, now)

    def cached_rows(self, keys: list[str]) -> list[dict[str, int]] | None:
        """The rows of ``keys`` from this node's cache when all are there and fresh."""
        return self.rows.get_many(keys) if self.rows is not None else None

    def cache_rows(self, keys: list[str], rows: list[dict[str, int]]) -> None:
        if self.rows is not None:
            self.rows.put_many(keys, rows)

    async def record(self, store, ip: str, sender: str, category: str,
                     now: float | None = None) -> None:
        now = time.time() if now is None else now
        field = f"{category}:{int(now // self.bucket)}"
        subj = self.subjects(ip, sender)
        items = {key: {field: 1} for key in subj.values()}
        if self.buffer is not None:
            self.buffer.add(store, items, ttl=self.max_age + self.bucket)
            return
        await store.mhincr(items, ttl=self.max_age + self.bucket)
        if self.rows is not None:
            self.rows.add_counts(items)  # this node's cached standings include it at once

    def judge(self, standing: Standing) -> str | None:
        """"bad", "good" or None (too little history or in between)."""
        if standing.total < self.min_messages:
            return None
        if standing.bad_ratio >= self.bad_ratio:
            return "bad"
        if standing.bad_ratio <= self.good_ratio:
            return "good"
        return None


class ExpiringMap:
    """key -> value, each kept for its own time (monotonic clock), at most ``limit`` keys: when
    full, the expired entries go, and everything when that is not enough (it is a cache: it may
    forget). Shared by the node-local caches (reputation rows, greylist passes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data: dict[str, tuple[float, object]] = {}  # key -> (expires, value)

    def get(self, key: str, now: float | None = None):
        """The value, or None when absent or expired."""
        got = self.data.get(key)
        if got is None or got[0] < (time.monotonic() if now is None else now):
            return None
        return got[1]

    def put(self, key: str, value, ttl: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self.data) >= self.limit:
            self.data = {k: v for k, v in self.data.items() if v[0] >= now}
            if len(self.data) >= self.limit:
                self.data.clear()
        self.data[key] = (now + ttl, value)


class RowCache:
    """Standings rows read from the store, kept on this node for ``ttl`` seconds: a sender
    that sends again within the TTL costs no read. Reputation is statistics over days: a
    standing at most ``ttl`` old is as good as a fresh one. This node's own learning is added to
    the cached rows as it is written (and seen before that through :class:`LearnBuffer`); other
    nodes' learning shows after at most ``ttl``."""

    MAX_ENTRIES = 100_000

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.rows = ExpiringMap(self.MAX_ENTRIES)

    def get_many(self, keys: list[str]) -> list[dict[str, int]] | None:
        now = time.monotonic()
        out = []
        for k in keys:
            row = self.rows.get(k, now)
            if row is None:
                return None
            out.append(row)
        return out

    def put_many(self, keys: list[str], rows: list[dict[str, int]]) -> None:
        now = time.monotonic()
        for k, row in zip(keys, rows):
            self.rows.put(k, dict(row), self.ttl, now)

    def add_counts(self, items: dict[str, dict[str, int]]) -> None:
        for k, counts in items.items():
            got = self.rows.data.get(k)
            if got is not None:
                row = got[1]
                for f, n in counts.items():
                    row[f] = row.get(f, 0) + n


class LearnBuffer:
    """Reputation learning, written behind: the counts of every message learnt in the last
    ``interval`` seconds go to the store in ONE round trip (counts of the same subject added up),
    instead of one write per message on that message's path.

    Standings read on this node add what is still pending or being written, so the next message
    from a sender already sees the previous one's outcome; other nodes sharing Redis see it after
    the next flush (at most ``interval`` later). A flush that fails (store down in ``skip`` mode)
    logs a warning and drops those counts: reputation is statistics, not mail. ``flush()`` is
    awaited at shutdown, so a clean stop or reload loses nothing."""

    MAX_PENDING = 100_000  # subjects held while the store keeps failing; beyond that, dropped
    SLICE = 48  # subjects per store call

    def __init__(self, interval: float, rows: "RowCache | None" = None):
        self.interval = interval
        self.rows = rows  # written counts are added to the rows this node has cached
        self.pending: dict[str, dict[str, int]] = {}
        self.inflight: dict[str, dict[str, int]] = {}
        self.store = None
        self.ttl: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    def add(self, store, items: dict[str, dict[str, int]], ttl: float | None) -> None:
        self.store, self.ttl = store, ttl
        if len(self.pending) >= self.MAX_PENDING:
            log.warning("reputation: %d subjects waiting to be written; dropping new counts "
                        "until the store accepts writes again", len(self.pending))
            return
        for key, counts in items.items():
            row = self.pending.setdefault(key, {})
            for f, n in counts.items():
                row[f] = row.get(f, 0) + n
        if self._timer is None and self._task is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._start)

    def merged(self, key: str, row: dict[str, int]) -> dict[str, int]:
        """``row`` as read from the store plus this node's unwritten counts."""
        extra = [d[key] for d in (self.pending, self.inflight) if key in d]
        if not extra:
            return row
        out = dict(row)
        for d in extra:
            for f, n in d.items():
                out[f] = out.get(f, 0) + n
        return out

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._flush_then_reschedule())

    async def _flush_then_reschedule(self) -> None:
        try:
            await self.flush()
        finally:
            self._task = None
            if self.pending and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self._start)

    async def flush(self) -> None:
        """Write what is pending now (one store round trip)."""
        if self._timer is not None and self._task is None:
            self._timer.cancel()
            self._timer = None
        if not self.pending or self.store is None:
            return
        self.inflight, self.pending = self.pending, {}
        try:
            # in slices: one huge call would hold Redis (single-threaded) and this event loop
            # long enough to delay the rate-limit and greylist lookups of messages in flight
            keys = list(self.inflight)
            for i in range(0, len(keys), self.SLICE):
                part = {k: self.inflight[k] for k in keys[i:i + self.SLICE]}
                await self.store.mhincr(part, ttl=self.ttl)
                if self.rows is not None:
                    self.rows.add_counts(part)
        except StoreError as exc:
            log.warning("reputation: could not write the counts of %d subjects, dropped: %s",
                        len(self.inflight), exc)
        finally:
            self.inflight = {}

    async def close(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)
        await self.flush()


# -- store trouble never stops mail ----------------------------------------------------------------
def active(ctx, options) -> bool:
    """False for ``filterd check`` (front door "check") unless the plugin's ``in_check`` is set:
    a check is a dry run that neither reads nor writes shared state by default."""
    return ctx.session.front_door != "check" or bool(options.get("in_check"))


async def guarded(ctx, plugin: str, op, default=None):
    """Run ``op(store)`` (an async store operation). If the store cannot be opened, is
    unavailable (Redis down in ``skip`` mode) or fails, the check is skipped:
    ``STORE_UNAVAILABLE`` (score 0) names the plugin and ``default`` is returned. While Redis is
    down in ``fallback`` mode, ``STORE_FALLBACK`` marks the message. Never raises a store error,
    never tempfails."""
    try:
        store = ctx.services.store
        result = await op(store)
    except StoreUnavailable as exc:
        ctx.add_symbol("STORE_UNAVAILABLE", 0.0, [plugin], f"{plugin} skipped: {exc}",
                       source=plugin)
        return default
    except StoreError as exc:
        log.warning("%s: store error, check skipped for this message: %s", plugin, exc)
        ctx.add_symbol("STORE_UNAVAILABLE", 0.0, [plugin], f"{plugin} skipped: {exc}",
                       source=plugin)
        return default
    if getattr(store, "degraded", None) == "fallback":
        ctx.add_symbol("STORE_FALLBACK", 0.0, [plugin],
                       "shared store down; state of this node used", source=plugin)
    return result
