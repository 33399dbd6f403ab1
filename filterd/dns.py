"""The one DNS service every part of filterd uses (SPF, DKIM, DMARC, DNSBL, MX routing...).

:class:`Resolver` wraps dnspython's asyncio resolver with a TTL-respecting cache and a timeout.
:class:`FixtureResolver` is its test double: same interface, answers from zone data held in
memory (from a TOML fixture file or a dict), never touching the network.

Answers are plain strings in presentation format (``"10 mx.example.com."`` for MX, the joined
character-strings for TXT), so callers never depend on dnspython types.
"""
from __future__ import annotations

import asyncio
import time
import tomllib
from collections import OrderedDict
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename


class DNSError(Exception):
    """A lookup failed for a reason other than "no such name/no data": timeout, SERVFAIL...
    Callers usually map it to a *temperror*."""


@dataclass
class Answer:
    name: str
    rdtype: str
    records: list[str]
    ttl: int
    nxdomain: bool = False


def _fmt(rdtype: str, rdata) -> str:
    if rdtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", "replace")
    return rdata.to_text()


class BaseResolver:
    """Interface: ``await query(name, rdtype) -> Answer``; empty ``records`` means no data
    (``nxdomain`` set when the name does not exist). Raises :class:`DNSError` on failure."""

    async def query(self, name: str, rdtype: str = "A") -> Answer:  # pragma: no cover - interface
        raise NotImplementedError

    async def txt(self, name: str) -> list[str]:
        return (await self.query(name, "TXT")).records

    async def addresses(self, name: str) -> list[str]:
        """A and AAAA records of ``name`` (IPv4 first)."""
        out: list[str] = []
        for t in ("A", "AAAA"):
            out += (await self.query(name, t)).records
        return out

    async def mx(self, name: str) -> list[tuple[int, str]]:
        recs = []
        for r in (await self.query(name, "MX")).records:
            pref, _, host = r.partition(" ")
            recs.append((int(pref), host.rstrip(".").lower()))
        return sorted(recs)

    async def ptr(self, ip: str) -> list[str]:
        name = dns.reversename.from_address(ip).to_text()
        return [r.rstrip(".") for r in (await self.query(name, "PTR")).records]

    def query_sync(self, name: str, rdtype: str, loop: asyncio.AbstractEventLoop) -> Answer:
        """For synchronous libraries running in a worker thread (pyspf, dkimpy): run the query on
        the event loop ``loop`` and wait for it."""
        return asyncio.run_coroutine_threadsafe(self.query(name, rdtype), loop).result()


class _Cache:
    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()

    def get(self, key):
        item = self.data.get(key)
        if item is None:
            return None
        expires, ans = item
        if expires < time.monotonic():
            del self.data[key]
            return None
        self.data.move_to_end(key)
        return ans

    def put(self, key, ans: Answer, ttl: int):
        if self.size <= 0:
            return
        self.data[key] = (time.monotonic() + max(ttl, 0), ans)
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)


def _split_server(server: str, port: int) -> tuple[str, int]:
    """"1.2.3.4", "1.2.3.4:5353", "::1", "[::1]:5353" -> (address, port)."""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else port
    if server.count(":") == 1:
        host, _, p = server.partition(":")
        return host, int(p)
    return server, port


class Resolver(BaseResolver):
    """dnspython asyncio resolver with a cache. Negative answers are cached for the SOA minimum
    (dnspython reports it as the NXDOMAIN/NoAnswer TTL) or 60 s."""

    def __init__(self, nameservers: list[str] | None = None, timeout: float = 5.0,
                 cache_size: int = 10000):
        self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            ips, port = [], 53
            for ns in nameservers:
                host, port = _split_server(ns, port)
                ips.append(host)
            self._resolver.nameservers = ips
            self._resolver.port = port
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self.cache = _Cache(cache_size)
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    async def query(self, name: str, rdtype: str = "A") -> Answer:
        key = (name.lower().rstrip("."), rdtype.upper())
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        fut = self._inflight.get(key)
        if fut is not None:  # one network lookup for concurrent identical questions
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            ans = await self._lookup(*key)
            fut.set_result(ans)
            return ans
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._inflight.pop(key, None)

    async def _lookup(self, name: str, rdtype: str) -> Answer:
        try:
            res = await self._resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            ans = Answer(name, rdtype, [], 60, nxdomain=True)
            self.cache.put((name, rdtype), ans, 60)
            return ans
        except (dns.resolver.NoNameservers, dns.exception.Timeout,
                dns.resolver.LifetimeTimeout) as exc:
            raise DNSError(f"{name}/{rdtype}: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise DNSError(f"{name}/{rdtype}: {exc}") from exc
        records = [_fmt(rdtype, r) for r in res.rrset] if res.rrset is not None else []
        ttl = res.rrset.ttl if res.rrset is not None else 60
        ans = Answer(name, rdtype, records, ttl)
        self.cache.put((name, rdtype), ans, ttl)
        return ans


class FixtureResolver(BaseResolver):
    """Answers from zone data: ``{name: {rdtype: [records]}}``. A record list equal to the
    string ``"TIMEOUT"`` (or a name mapped to ``"TIMEOUT"``) raises :class:`DNSError`, as a
    timeout would. The type key ``"*"`` applies to every type the name does not list (e.g.
    ``{"TXT": [...], "*": "TIMEOUT"}``: TXT answers, every other type times out). Names absent
    from the data are NXDOMAIN. A ``CNAME`` record is followed like a recursive resolver does
    (answers are those of the target; a loop or a chain longer than 8 raises
    :class:`DNSError`, like the SERVFAIL a real resolver gives). Queries are counted in
    ``self.queries`` so tests can check caching and lookup limits."""

    MAX_CNAME_CHAIN = 8

    def __init__(self, zones: dict | None = None):
        self.zones: dict[str, object] = {}
        self.queries: list[tuple[str, str]] = []
        for name, recs in (zones or {}).items():
            self.add(name, recs)

    @classmethod
    def from_file(cls, path: str) -> "FixtureResolver":
        with open(path, "rb") as f:
            return cls(tomllib.load(f))

    def add(self, name: str, records) -> None:
        key = name.lower().rstrip(".")
        if isinstance(records, dict):
            entry = self.zones.setdefault(key, {})
            if isinstance(entry, dict):
                for t, v in records.items():
                    entry.setdefault(t.upper(), [])
                    if v == "TIMEOUT":
                        entry[t.upper()] = "TIMEOUT"
                    else:
                        entry[t.upper()].extend([v] if isinstance(v, str) else list(v))
        else:
            self.zones[key] = records

    async def query(self, name: str, rdtype: str = "A") -> Answer:
        key = name.lower().rstrip(".")
        rdtype = rdtype.upper()
        self.queries.append((key, rdtype))
        seen = [key]
        while True:
            entry = self.zones.get(key)
            if entry == "TIMEOUT":
                raise DNSError(f"{name}/{rdtype}: timed out (fixture)")
            if entry is None:
                return Answer(key, rdtype, [], 60, nxdomain=True)
            recs = entry.get(rdtype)  # type: ignore[union-attr]
            if recs is None and rdtype != "CNAME" and entry.get("CNAME"):  # type: ignore
                target = str(entry["CNAME"][0]).lower().rstrip(".")  # type: ignore[index]
                if target in seen or len(seen) > self.MAX_CNAME_CHAIN:
                    raise DNSError(f"{name}/{rdtype}: CNAME loop or chain too long "
                                   f"({' -> '.join(seen + [target])}) (fixture)")
                seen.append(target)
                key = target
                continue
            if recs is None:
                recs = entry.get("*", [])  # type: ignore[union-attr]
            if recs == "TIMEOUT":
                raise DNSError(f"{name}/{rdtype}: timed out (fixture)")
            return Answer(key, rdtype, [str(r) for r in recs], 300)


def from_config(cfg) -> BaseResolver:
    section = cfg.section("dns")
    if section.get("fixtures"):
        return FixtureResolver.from_file(section["fixtures"])
    from .config import parse_duration

    return Resolver(section.get("nameservers") or None,
                    parse_duration(section.get("timeout", "5s")),
                    int(section.get("cache_size", 10000)))
