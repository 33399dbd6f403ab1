"""DMARC (RFC 7489): finds the policy of the RFC5322.From domain (falling back to its
organizational domain from the Public Suffix List shipped in ``publicsuffixlist``), checks SPF
and DKIM alignment (relaxed or strict), applies p/sp/pct, and turns the policy into a verdict the
admin can soften ([dmarc] on_reject / on_quarantine / never_enforce). Records per source IP and
result what aggregate reports need (``services.store``). Result in ``ctx.data["dmarc"]``."""
from __future__ import annotations

import logging
import random
import re
import time

from filterd.auth import DMARCResult, is_outbound, org_domain, public_suffix_list
from filterd.dns import DNSError
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict

log = logging.getLogger("filterd.dmarc")

CONFIG = """
# What a DMARC failure under p=reject does here: reject at end of DATA, quarantine, or only
# score (DMARC_POLICY_REJECT symbol).
on_reject = "reject"  # one of: reject, quarantine, score
# What a DMARC failure under p=quarantine does here.
on_quarantine = "quarantine"  # one of: reject, quarantine, score
# From domains whose policy is never enforced here (only scored), e.g. partners whose mail
# breaks DMARC through a forwarder. Subdomains included.
never_enforce = []
# ARC sealers (domains) trusted to vouch for mail they forwarded (mailing lists, forwarders):
# when DMARC fails here but the ARC chain passes and one of these sealers recorded dmarc=pass
# in its ARC-Authentication-Results, the policy is not enforced (RFC 7489 local override,
# RFC 8617 7.2). Subdomains included.
trusted_arc_sealers = []
# Honour pct= (sampling): a failure outside the sample gets the next weaker policy (RFC 7489
# 6.6.4). false = always apply the full policy.
honour_pct = true
# Record aggregate-report data (per day, policy domain, source IP, result) in the store.
record_reports = true
# How long aggregate data is kept.
report_ttl = "32d"
"""

SUGGESTED = {"pass": -0.5, "fail": 1.0, "none": 0.0, "temperror": 0.0, "permerror": 0.5}
POLICY_SCORES = {"reject": 3.0, "quarantine": 1.5, "none": 0.0}
WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def parse_record(text: str) -> dict | None:
    """Tags of a DMARC record, or None when it is not one (RFC 7489 6.3/6.6.3)."""
    tags: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";")]
    if not parts or parts[0].replace(" ", "") != "v=DMARC1":
        return None
    for p in parts[1:]:
        if not p:
            continue
        k, sep, v = p.partition("=")
        if not sep:
            continue
        tags.setdefault(k.strip().lower(), v.strip())
    tags["v"] = "DMARC1"
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        # 6.6.3: an invalid or missing p= with a valid rua= is p=none; otherwise no record
        if "rua" in tags:
            tags["p"] = "none"
        else:
            return None
    else:
        tags["p"] = p
    sp = tags.get("sp", "").lower()
    if sp in ("none", "quarantine", "reject"):
        tags["sp"] = sp
    else:
        tags.pop("sp", None)
    for k in ("adkim", "aspf"):
        tags[k] = "s" if tags.get(k, "r").lower() == "s" else "r"
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    tags["pct"] = str(min(max(pct, 0), 100))
    return tags


async def fetch_record(resolver, name: str) -> tuple[dict | None, str]:
    """(record, error): error "temperror" on DNS failure."""
    try:
        ans = await resolver.query(f"_dmarc.{name}", "TXT")
    except DNSError:
        return None, "temperror"
    recs = [r for r in (parse_record(t) for t in ans.records) if r is not None]
    if len(recs) != 1:  # none, or several: no policy (6.6.3)
        return None, ""
    return recs[0], ""


def aligned(a: str, b: str, mode: str) -> bool:
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return org_domain(a) == org_domain(b)


async def evaluate(resolver, from_domain: str, spf_result, dkim_results, pct_roll=None
                   ) -> DMARCResult:
    res = DMARCResult("none", domain=from_domain)
    od = org_domain(from_domain)
    res.org_domain = od
    record, err = await fetch_record(resolver, from_domain)
    policy_domain = from_domain
    if record is None and not err and od and od != from_domain:
        record, err = await fetch_record(resolver, od)
        policy_domain = od
    if err:
        res.result, res.reason = "temperror", "DNS lookup of the DMARC record failed"
        return res
    if record is None:
        res.reason = "no DMARC record"
        return res
    res.record = record
    res.policy_domain = policy_domain
    if policy_domain != from_domain and "sp" in record:
        res.policy = record["sp"]
    else:
        res.policy = record["p"]
    # SPF: pass for the RFC5321.MailFrom domain (HELO domain for the null sender), aligned
    if spf_result is not None and spf_result.result == "pass":
        res.spf_aligned = aligned(spf_result.domain, from_domain, record["aspf"])
    for r in dkim_results or []:
        if r.result == "pass" and aligned(r.domain, from_domain, record["adkim"]):
            res.dkim_aligned = True
            break
    if res.spf_aligned or res.dkim_aligned:
        res.result, res.disposition = "pass", "none"
        return res
    res.result = "fail"
    res.reason = "neither SPF nor DKIM aligned with the From domain"
    disposition = res.policy
    pct = int(record.get("pct", "100"))
    roll = random.randrange(100) if pct_roll is None else pct_roll
    if pct < 100 and roll >= pct:
        disposition = WEAKER[disposition]
        res.reason += f" (outside pct={pct} sample)"
    res.disposition = disposition
    return res


class Plugin:
    """DMARC policy evaluation and enforcement."""

    def __init__(self, options, services):
        self.options = options
        self.services = services

    @hookimpl
    def startup(self, options, services):
        public_suffix_list()  # loaded now, not on the first message (see its docstring)

    @hookimpl(tryfirst=True)  # before the plugins that use auth results (reputation ...)
    async def data(self, ctx, message, options):
        if is_outbound(ctx) and not ctx.config.get("auth.check_outbound"):
            return None
        parsed = message.parsed
        from_fields = parsed.get_all("From")
        addrs = [a for _, a in parsed.from_addresses if a]
        domains = []
        for a in addrs:
            d = a.rpartition("@")[2].strip().strip(">").lower().rstrip(".") if "@" in a else ""
            if d and d not in domains:
                domains.append(d)
        if not from_fields or not domains:
            what = "no From header" if not from_fields else "From header without a domain"
            res = DMARCResult("permerror", reason=what)
            ctx.data["dmarc"] = res
            ctx.add_symbol("DMARC_PERMERROR", SUGGESTED["permerror"], [what],
                           f"DMARC cannot be applied: {what}", source="dmarc")
            return None
        if len(from_fields) > 1 or len(addrs) > 1:
            ctx.add_symbol("DMARC_MULTIPLE_FROM", 1.0, domains,
                           f"{len(from_fields)} From header(s) with {len(addrs)} addresses; "
                           f"DMARC applied to each domain", source="dmarc")
        spf = (ctx.data.get("spf") or {}).get("mailfrom")
        dkim = ctx.data.get("dkim") or []
        results = [await evaluate(ctx.services.dns, d, spf, dkim) for d in domains]
        # the worst of several From domains counts (a second From must not dodge a policy)
        order = {"fail": 4, "temperror": 3, "permerror": 2, "none": 1, "pass": 0}
        res = max(results, key=lambda r: (order[r.result], POLICY_SCORES.get(r.disposition, 0)))
        ctx.data["dmarc"] = res
        ctx.add_symbol(f"DMARC_{res.result.upper()}", SUGGESTED[res.result],
                       [res.domain, f"p={res.policy}"] if res.record else [res.domain],
                       f"DMARC {res.result} for {res.domain}"
                       + (f": {res.reason}" if res.reason else ""), source="dmarc")
        verdict = None
        if res.result == "fail" and options.get("trusted_arc_sealers"):
            sealer = await self._trusted_arc(ctx, message, options["trusted_arc_sealers"])
            if sealer:
                res.disposition = "none"
                res.reason += (f"; policy not applied: ARC chain sealed by trusted {sealer} "
                               f"recorded dmarc=pass")
                ctx.add_symbol("DMARC_ARC_OVERRIDE", 0.0, [sealer],
                               f"DMARC fail overridden: trusted ARC sealer {sealer} saw a pass",
                               source="dmarc")
                if options.get("record_reports", True) and ctx.session.front_door != "check":
                    await self._record(ctx, res, options)
                return None
        if res.result == "fail":
            ctx.add_symbol(f"DMARC_POLICY_{res.disposition.upper()}",
                           POLICY_SCORES[res.disposition], [res.policy_domain],
                           f"DMARC policy {res.policy} of {res.policy_domain} "
                           f"(applied: {res.disposition})", source="dmarc")
            verdict = self._verdict(res, options)
        if options.get("record_reports", True) and ctx.session.front_door != "check":
            await self._record(ctx, res, options)
        return verdict

    @staticmethod
    async def _trusted_arc(ctx, message, trusted) -> str:
        """The trusted sealer whose ARC-Authentication-Results recorded dmarc=pass on a passing
        chain, or "". Validates the chain here when the arc plugin has not yet (it then reuses
        the result)."""
        arc = ctx.data.get("arc")
        if arc is None:
            from filterd_plugins.arc import validate

            arc = await validate(ctx.services.dns, message.raw)
            ctx.data["arc"] = arc
        if arc.result != "pass":
            return ""
        names = [str(t).lower().rstrip(".") for t in trusted]
        for detail in arc.details:
            d = detail.get("as-domain", b"")
            d = (d.decode("ascii", "replace") if isinstance(d, bytes) else str(d)).lower()
            aar = detail.get("aar-value", b"")
            aar = aar.decode("utf-8", "replace") if isinstance(aar, bytes) else str(aar)
            if any(d == t or d.endswith("." + t) for t in names) and \
                    re.search(r"(^|[;\s])dmarc\s*=\s*pass\b", aar, re.I):
                return d
        return ""

    @staticmethod
    def _verdict(res: DMARCResult, options) -> Verdict | None:
        for d in options.get("never_enforce") or []:
            d = str(d).lower().rstrip(".")
            if res.domain == d or res.domain.endswith("." + d):
                res.disposition = "none"
                return None
        what = {"reject": options.get("on_reject", "reject"),
                "quarantine": options.get("on_quarantine", "quarantine")}.get(res.disposition)
        text = (f"DMARC policy of {res.policy_domain} ({res.policy}): message not authenticated "
                f"for {res.domain}")
        if what == "reject":
            res.disposition = "reject"
            return Verdict.reject(text, code=550, enhanced="5.7.1")
        if what == "quarantine":
            res.disposition = "quarantine"
            return Verdict.quarantine(text)
        if what == "score":
            res.disposition = "none"
        return None

    async def _record(self, ctx, res: DMARCResult, options) -> None:
        if not res.record:
            return
        from filterd.config import parse_duration

        day = time.strftime("%Y-%m-%d", time.gmtime())
        ttl = parse_duration(options.get("report_ttl") or "32d")
        dkim_res = "pass" if res.dkim_aligned else "fail"
        spf_res = "pass" if res.spf_aligned else "fail"
        field = "|".join([ctx.session.peer_ip, res.disposition, dkim_res, spf_res, res.domain])
        try:
            store = ctx.services.store
            await store.hincr(f"dmarc:agg:{day}:{res.policy_domain}", {field: 1}, ttl=ttl)
            await store.set_json(f"dmarc:policy:{day}:{res.policy_domain}", res.record, ttl=ttl)
        except Exception as exc:  # noqa: BLE001 - reporting must never cost a message
            log.warning("dmarc: could not record aggregate data for %s: %s",
                        res.policy_domain, exc)
            ctx.errors.append(f"dmarc: aggregate data not recorded: {exc}")
