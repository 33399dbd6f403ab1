"""SPF (RFC 7208): checks the MAIL FROM identity (the HELO identity for the null sender) and the
HELO identity with pyspf, its DNS routed through filterd's resolver. Results become symbols
SPF_PASS / SPF_FAIL / SPF_SOFTFAIL / SPF_NEUTRAL / SPF_NONE / SPF_TEMPERROR / SPF_PERMERROR (and
SPF_HELO_* for the HELO identity) and ``ctx.data["spf"]`` for DMARC and Authentication-Results."""
from __future__ import annotations

import asyncio
import threading
import time

import spf as pyspf

from filterd.auth import SPFResult, authserv_id, is_outbound
from filterd.dns import DNSError
from filterd.hookspecs import hookimpl
from filterd.reputation import ip_in
from filterd.verdict import Verdict

CONFIG = """
# Also check the HELO identity (RFC 7208 2.3); reported as SPF_HELO_* and in
# Authentication-Results as spf ... smtp.helo.
check_helo = true
# Reject at MAIL FROM when the MAIL FROM result is fail (otherwise the result is only scored).
reject_on_fail = false
# Tempfail at MAIL FROM when the result is temperror (otherwise only scored).
tempfail_on_temperror = false
# Time one SPF evaluation may take (all its DNS lookups) before it ends in temperror. Keep it
# below [plugins] timeout.
lookup_budget = "8s"
# Explanation given for fail when the domain publishes no exp= (%{d} etc. are not expanded).
default_explanation = "SPF check failed; see RFC 7208"
# Clients whose mail is not SPF-checked (no SPF result, as for outbound mail): mail handed over
# on this host (loopback) is not from the Internet. The same default as pypolicyd-spf's
# skip_addresses and rspamd's local_addrs; add your own relays here, or [] to check everyone.
skip_networks = ["127.0.0.0/8", "::1/128"]
"""

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_OLD = {"unknown": "permerror", "error": "temperror", "ambiguous": "permerror"}

# pyspf looks up DNS through the module-level function DNSLookup. We replace it once with a
# dispatcher that asks the lookup of the check running in this thread (an evaluation sets it for
# the time it runs, in the event loop or in a worker thread), so every query goes through
# filterd.dns.
_local = threading.local()
_original_lookup = pyspf.DNSLookup


def _dispatch(name, qtype, strict=True, timeout=None):
    lookup = getattr(_local, "lookup", None)
    if lookup is None:  # pyspf used outside our plugin
        return _original_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype)


pyspf.DNSLookup = _dispatch


class _Query(pyspf.query):
    def validated_ptrs(self):
        """As pyspf, but a DNS error on one PTR name's A lookup skips that name (RFC 7208
        5.5: "If a DNS error occurs while doing an A RR lookup, then that domain name is
        skipped and the search continues")."""
        limit = pyspf.MAX_PTR if self.strict else pyspf.MAX_PTR * 4
        out = []
        for p in self.dns_ptr(self.i)[:limit]:
            try:
                if self.cidrmatch(self.dns_a(p, self.A), self.cidrmax):
                    out.append(p)
            except pyspf.TempError:
                continue
        return out


def _records(name: str, qtype: str, ans) -> list:
    """An :class:`~filterd.dns.Answer` in the shape pyspf's DNSLookup returns."""
    out = []
    for r in ans.records:
        if qtype in ("TXT", "SPF"):
            v = (r.encode("utf-8", "surrogateescape"),)
        elif qtype == "MX":
            pref, _, host = r.partition(" ")
            try:
                v = (int(pref), host.strip().rstrip("."))
            except ValueError:
                continue
        elif qtype in ("PTR", "CNAME"):
            v = r.rstrip(".")
        else:
            v = r
        out.append(((name, qtype), v))
    return out


class _NeedDNS(BaseException):
    """A replayed evaluation reached a DNS answer not fetched yet (a BaseException, so that no
    ``except Exception`` in pyspf or here swallows it)."""

    def __init__(self, name: str, qtype: str):
        super().__init__(name, qtype)
        self.key = (name, qtype)


def _answered_lookup(answers: dict, deadline: float, resolver=None, loop=None,
                     missing: list | None = None):
    """pyspf's DNS from the answers fetched so far. A question not answered yet is noted in
    ``missing`` and raises :class:`_NeedDNS` (evaluation in the event loop: fetch it and
    evaluate again; pyspf swallows it in two places, hence the note) or, with ``resolver``
    and ``loop`` (evaluation in a worker thread), is asked on the loop and waited for."""
    def lookup(name: str, qtype: str):
        if time.monotonic() > deadline:
            raise pyspf.TempError("DNS: SPF lookup budget exhausted")
        key = (name, qtype)
        ans = answers.get(key)
        if ans is None:
            if resolver is None:
                missing.append(key)
                raise _NeedDNS(name, qtype)
            try:
                ans = resolver.query_sync(name, qtype, loop)
            except DNSError as exc:
                ans = exc
            answers[key] = ans
        if isinstance(ans, DNSError):
            raise pyspf.TempError(f"DNS {ans}")
        return _records(name, qtype, ans)

    return lookup


def _run_check(lookup, ip: str, sender: str, helo: str, receiver: str, default_exp: str,
               querytime: float) -> tuple[str, str]:
    _local.lookup = lookup
    try:
        q = _Query(i=ip, s=sender, h=helo, receiver=receiver, querytime=querytime)
        q.set_default_explanation(default_exp)
        res, _code, exp = q.check()
    except pyspf.TempError as exc:
        res, exp = "temperror", str(exc)
    except pyspf.PermError as exc:
        res, exp = "permerror", str(exc)
    except Exception as exc:  # noqa: BLE001 - a library bug must end in an RFC result
        res, exp = "permerror", f"SPF evaluation failed: {type(exc).__name__}: {exc}"
    finally:
        _local.lookup = None
    res = _OLD.get(res, res)
    if res not in RESULTS:
        res = "permerror"
    return res, exp or ""


# An evaluation runs in the event loop and starts again from the top each time it needs a DNS
# answer it does not have (most domains need one to three: no record, ip4/a/mx, one include);
# one that needs more than this many answers finishes in a worker thread with the answers so far.
REPLAYS = 4


async def check_spf(resolver, ip: str, sender: str, helo: str, receiver: str = "",
                    default_explanation: str = "", budget: float = 8.0) -> SPFResult:
    """One SPF evaluation (RFC 7208 check_host through pyspf) with DNS from ``resolver``.
    ``sender`` "" means the null sender: the HELO identity is checked instead.

    pyspf is synchronous. Rather than running it in a worker thread (whose contention for the
    GIL with the event loop costs more than the evaluation), it runs in the loop on the DNS
    answers fetched so far, and each answer it lacks is fetched and the evaluation replayed;
    after REPLAYS answers it goes on in a thread."""
    identity = "mailfrom" if sender else "helo"
    checked = sender or (f"postmaster@{helo}" if helo else "")
    domain = checked.rpartition("@")[2] if checked else ""
    if not ip:
        return SPFResult(identity, domain, "none", "no client IP", checked)
    deadline = time.monotonic() + budget
    answers: dict = {}
    args = (ip, sender, helo, receiver, default_explanation, budget)
    try:
        async with asyncio.timeout(budget + 1):
            for _ in range(REPLAYS + 1):
                missing: list = []
                try:
                    res, exp = _run_check(_answered_lookup(answers, deadline, missing=missing),
                                          *args)
                except _NeedDNS:
                    pass
                if not missing:
                    break
                for key in dict.fromkeys(missing):  # (an exp= or ptr lookup pyspf swallowed)
                    try:
                        answers[key] = await resolver.query(*key)
                    except DNSError as exc:
                        answers[key] = exc
            else:
                lookup = _answered_lookup(answers, deadline, resolver,
                                          asyncio.get_running_loop())
                res, exp = await asyncio.to_thread(_run_check, lookup, *args)
    except TimeoutError:
        res, exp = "temperror", "SPF evaluation timed out"
    return SPFResult(identity, domain, res, exp, checked)


SYMBOL_SUGGESTED = {"pass": -0.5, "fail": 3.0, "softfail": 1.0, "neutral": 0.0, "none": 0.0,
                    "temperror": 0.0, "permerror": 0.5}


class Plugin:
    """SPF checks of MAIL FROM and HELO (pyspf, DNS through filterd's resolver)."""

    def __init__(self, options, services):
        self.options = options
        self.services = services

    async def _evaluate(self, ctx) -> dict | None:
        if "spf" in ctx.data:
            return ctx.data["spf"]
        if is_outbound(ctx) and not ctx.config.get("auth.check_outbound"):
            return None
        opts = self.options
        if ip_in(ctx.session.peer_ip, opts.get("skip_networks") or []):
            return None
        from filterd.config import parse_duration

        budget = parse_duration(opts.get("lookup_budget") or "8s")
        session = ctx.session
        ip = session.peer_ip.split("%")[0] if session.peer_ip else ""
        receiver = authserv_id(ctx.config)
        dns = ctx.services.dns
        sender = ctx.transaction.mail_from
        mf = await check_spf(dns, ip, sender, session.helo, receiver,
                             opts.get("default_explanation", ""), budget)
        helo_res = None
        if opts.get("check_helo", True) and session.helo:
            if not sender:
                helo_res = mf
            else:
                cache = session.data.setdefault("spf.helo", {})
                key = (ip, session.helo.lower())
                helo_res = cache.get(key)
                if helo_res is None:
                    helo_res = await check_spf(dns, ip, "", session.helo, receiver,
                                               opts.get("default_explanation", ""), budget)
                    cache[key] = helo_res
        data = {"mailfrom": mf, "helo": helo_res}
        ctx.data["spf"] = data
        ctx.add_symbol(f"SPF_{mf.result.upper()}", SYMBOL_SUGGESTED[mf.result],
                       options=[mf.domain or "-", ip],
                       description=f"SPF {mf.result} for {mf.identity} {mf.sender or '<>'}"
                                   + (f": {mf.explanation}" if mf.explanation and
                                      mf.result not in ("pass", "none") else ""),
                       source="spf")
        if helo_res is not None and helo_res is not mf:
            ctx.add_symbol(f"SPF_HELO_{helo_res.result.upper()}", 0.0,
                           options=[helo_res.domain or "-"],
                           description=f"SPF {helo_res.result} for HELO {session.helo}",
                           source="spf")
        return data

    def wants(self, hook, session=None, address=None) -> bool:
        # SPF is always evaluated (here or in ``data``); MAIL FROM only has to wait for it when
        # a fail or temperror refuses the sender there
        return hook != "mail_from" or bool(self.options.get("reject_on_fail")
                                           or self.options.get("tempfail_on_temperror"))

    @hookimpl
    async def mail_from(self, ctx, sender, params, options):
        data = await self._evaluate(ctx)
        if data is None:
            return None
        mf = data["mailfrom"]
        if mf.result == "fail" and options.get("reject_on_fail"):
            exp = mf.explanation or options.get("default_explanation") or "SPF fail"
            return Verdict.reject(f"SPF fail: {exp}", code=550, enhanced="5.7.23")
        if mf.result == "temperror" and options.get("tempfail_on_temperror"):
            return Verdict.tempfail("SPF temporary error: DNS lookup failed", code=451,
                                    enhanced="4.7.24")
        return None

    @hookimpl(tryfirst=True)  # before the plugins that use auth results (reputation ...)
    async def data(self, ctx, message, options):
        # normally done at MAIL FROM; pipelines driven without that phase still get SPF
        await self._evaluate(ctx)
        return None
