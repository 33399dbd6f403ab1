"""Routing: which transport and next hop each recipient domain uses.

Order: ``[delivery] local_domains`` → local; ``[delivery.transports]`` (exact domain, then
".parent" entries for subdomains) → that transport; ``relayhost`` → smarthost; else
``default_transport``.

Transport specs: ``local``, ``mx``, ``smtp:host:port`` (``host`` looked up as A/AAAA),
``smtp:[host]:port`` (same; brackets as in Postfix say "no MX lookup", which is always the case
here), ``lmtp:host:port``, ``lmtp:unix:/path``. A relayhost may omit the ``smtp:`` prefix.

MX resolution follows RFC 5321 section 5: MX records in preference order (ties shuffled), the
domain's own A/AAAA when it has no MX (implicit MX), a permanent failure for a null MX
(RFC 7505) or a domain that does not exist, a temporary failure when DNS fails.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from dataclasses import dataclass


class RouteError(Exception):
    def __init__(self, message: str, permanent: bool, status: str):
        super().__init__(message)
        self.permanent = permanent
        self.status = status


@dataclass(frozen=True)
class Route:
    kind: str  # local | mx | smtp | lmtp
    host: str = ""  # smtp/lmtp: next hop; mx: the recipient domain
    port: int = 25
    unix_path: str = ""

    @property
    def key(self) -> str:
        if self.kind == "local":
            return "local"
        if self.unix_path:
            return f"{self.kind}:unix:{self.unix_path}"
        return f"{self.kind}:{self.host}:{self.port}"


def parse_transport(spec: str, default_port: int = 25) -> Route:
    """Parse a transport spec; raises ValueError naming what is wrong."""
    s = spec.strip()
    if s in ("local", "mx"):
        return Route(s)
    kind = "smtp"
    if s.startswith(("smtp:", "lmtp:")):
        kind, s = s[:4], s[5:]
    if kind == "lmtp" and s.startswith("unix:"):
        return Route("lmtp", unix_path=s[5:])
    port = 24 if kind == "lmtp" else default_port
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif s.count(":") == 1:
        host, _, p = s.partition(":")
        port = int(p)
    else:
        host = s
    if not host:
        raise ValueError(f"transport {spec!r}: no host")
    return Route(kind, host.lower(), port)


class Router:
    def __init__(self, config, resolver_getter):
        d = config.get("delivery") or {}
        self.smtp_port = int(d.get("smtp_port", 25))
        self.local_domains = {x.lower().rstrip(".") for x in d.get("local_domains", [])}
        self.transports: dict[str, Route] = {}
        for dom, spec in (d.get("transports") or {}).items():
            if spec:
                self.transports[dom.lower().rstrip(".")] = parse_transport(spec, self.smtp_port)
        self.relay = parse_transport(d["relayhost"], 25) if d.get("relayhost") else None
        self.default = d.get("default_transport", "mx")
        self._resolver_getter = resolver_getter
        self._static_hops: dict[Route, tuple[float, list[tuple[str, str]]]] = {}

    def route(self, recipient: str) -> Route:
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        if domain in self.local_domains:
            return Route("local")
        if domain in self.transports:
            return self._mx_for(self.transports[domain], domain)
        parts = domain.split(".")
        for i in range(1, len(parts)):
            r = self.transports.get("." + ".".join(parts[i:]))
            if r is not None:
                return self._mx_for(r, domain)
        if self.relay is not None and self.default != "local":
            return self.relay
        if self.default == "local":
            return Route("local")
        if self.default == "relayhost":
            if self.relay is None:
                raise RouteError("default_transport is relayhost but [delivery] relayhost is "
                                 "empty", permanent=False, status="4.3.5")
            return self.relay
        return Route("mx", domain, self.smtp_port)

    def _mx_for(self, r: Route, domain: str) -> Route:
        return Route("mx", domain, self.smtp_port) if r.kind == "mx" else r

    async def next_hops(self, route: Route) -> list[tuple[str, str]]:
        """(host name, address) pairs to try in order. Raises RouteError."""
        if route.kind == "mx":
            return await self._mx_hops(route.host)
        if route.unix_path:
            return [(route.unix_path, "")]
        cached = self._static_hops.get(route)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        hops = [(route.host, a) for a in await self._addresses(route.host, use_dns=False)]
        self._static_hops[route] = (time.monotonic() + 60.0, hops)  # configured next hops
        return hops

    async def _addresses(self, host: str, use_dns: bool) -> list[str]:
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        if use_dns:
            from ..dns import DNSError
            try:
                return await self._resolver_getter().addresses(host)
            except DNSError as exc:
                raise RouteError(f"DNS lookup of {host} failed: {exc}", False, "4.4.3") from None
        # a configured next hop: the system resolver (/etc/hosts names like "localhost" work)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None,
                                                                 type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise RouteError(f"cannot resolve next hop {host}: {exc}", False, "4.4.3") from None
        out: list[str] = []
        for fam, *_, sa in infos:
            if sa[0] not in out:
                out.append(sa[0])
        return out

    async def _mx_hops(self, domain: str) -> list[tuple[str, str]]:
        from ..dns import DNSError
        resolver = self._resolver_getter()
        try:
            ans = await resolver.query(domain, "MX")
        except DNSError as exc:
            raise RouteError(f"MX lookup for {domain} failed: {exc}", False, "4.4.3") from None
        mxs: list[tuple[int, str]] = []
        for rec in ans.records:
            pref, _, host = rec.partition(" ")
            try:
                mxs.append((int(pref), host.strip().rstrip(".").lower()))
            except ValueError:
                continue
        if any(h == "" for _, h in mxs):
            raise RouteError(f"{domain} does not accept mail (null MX, RFC 7505)", True, "5.1.10")
        if not mxs:
            if ans.nxdomain:
                raise RouteError(f"domain {domain} does not exist", True, "5.1.2")
            hosts = [domain]  # implicit MX (RFC 5321 5.1)
        else:
            random.shuffle(mxs)  # equal preferences in random order
            hosts = [h for _, h in sorted(mxs, key=lambda m: m[0])]
        hops: list[tuple[str, str]] = []
        errors: list[str] = []
        for h in hosts:
            try:
                for a in await self._addresses(h, use_dns=True):
                    hops.append((h, a))
            except RouteError as exc:
                errors.append(str(exc))
        if not hops:
            if errors:
                raise RouteError("; ".join(errors), False, "4.4.3")
            if not mxs:
                raise RouteError(f"{domain} has no MX and no address records", True, "5.1.2")
            raise RouteError(f"no address for any MX host of {domain} "
                             f"({', '.join(hosts)})", False, "4.4.3")
        return hops
