"""Shared pieces of the sender-authentication plugins (``spf``, ``dkim``, ``arc``, ``dmarc``,
``auth_results``).

Results travel between the plugins in ``ctx.data`` under these keys (documented in
``docs/auth.md``):

- ``ctx.data["spf"]``: ``{"mailfrom": SPFResult, "helo": SPFResult | None}``
- ``ctx.data["dkim"]``: ``[DKIMResult, ...]`` — one per DKIM-Signature, top to bottom
- ``ctx.data["arc"]``: :class:`ARCResult`
- ``ctx.data["dmarc"]``: :class:`DMARCResult`
- ``ctx.data["auth.outbound"]``: True when the mail is ours (authenticated client or
  ``[auth] internal_networks``): signed, not SPF/DMARC-checked.

Nothing here touches the network except through ``ctx.services.dns`` (:mod:`filterd.dns`).
"""
from __future__ import annotations

import functools
import socket
from dataclasses import dataclass, field

from .dns import DNSError
from .reputation import parse_network
from .rewrite import field_name, field_value, header_fields, split_message
from .verdict import Modification

# ---------------------------------------------------------------------------------------------
# Result records
# ---------------------------------------------------------------------------------------------


@dataclass
class SPFResult:
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked ("" when there was nothing to check)
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    explanation: str = ""
    sender: str = ""  # the address checked (postmaster@helo for HELO)


@dataclass
class DKIMResult:
    result: str  # pass, fail, neutral, temperror, permerror (none when no signature)
    domain: str = ""  # d=
    selector: str = ""  # s=
    identity: str = ""  # i=
    algorithm: str = ""  # a=
    bits: int = 0
    reason: str = ""
    b_prefix: str = ""  # first characters of b= (header.b in Authentication-Results)


@dataclass
class ARCResult:
    result: str  # pass, fail, none
    reason: str = ""
    instances: int = 0
    oldest_pass: int = 0
    details: list = field(default_factory=list)
    sealing_domains: list = field(default_factory=list)  # d= of each ARC-Seal, oldest first
    # True when an earlier sealer already recorded cv=fail: the chain is terminated and no new
    # validation took place (RFC 8617 5.2 step 2; the ARC test suite's empty cv)
    terminated: bool = False


@dataclass
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    domain: str = ""  # RFC5322.From domain
    policy_domain: str = ""  # where the record was found
    org_domain: str = ""
    policy: str = "none"  # published p= (or sp=) that applies: none, quarantine, reject
    disposition: str = "none"  # what we apply after pct= and local overrides
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    record: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn() or "localhost"


def authserv_id(config) -> str:
    aid = (config.get("auth.authserv_id") or "").strip()
    if not aid:
        aid = (config.get("server.hostname") or "").strip()
    return (aid or _fqdn()).lower()


def is_outbound(ctx) -> bool:
    """Mail that is ours: an authenticated client, or a client in [auth] internal_networks."""
    if "auth.outbound" in ctx.data:
        return ctx.data["auth.outbound"]
    out = bool(ctx.session.auth_user)
    ip = ctx.session.ip
    if not out and ip is not None:
        for net in ctx.config.get("auth.internal_networks") or []:
            n = parse_network(str(net))
            if n is not None and ip.version == n.version and ip in n:
                out = True
                break
    ctx.data["auth.outbound"] = out
    return out


# ---------------------------------------------------------------------------------------------
# DNS helpers for the sync libraries (dkimpy): fetch asynchronously first, answer from memory
# ---------------------------------------------------------------------------------------------


class TXTPrefetch:
    """TXT answers fetched ahead through our resolver, served to dkimpy's ``dnsfunc``.

    ``failed`` holds the names whose lookup raised :class:`DNSError` (temperror)."""

    def __init__(self):
        self.answers: dict[str, list[str]] = {}
        self.failed: dict[str, str] = {}

    async def fetch(self, resolver, names) -> None:
        for name in names:
            key = name.lower().rstrip(".")
            if key in self.answers or key in self.failed:
                continue
            try:
                self.answers[key] = (await resolver.query(key, "TXT")).records
            except DNSError as exc:
                self.failed[key] = str(exc)

    def dnsfunc(self, name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        key = name.lower().rstrip(".")
        recs = self.answers.get(key) or []
        if not recs:
            return None
        # DKIM key records: the one starting with v=DKIM1 if several, else the first
        for r in recs:
            if r.replace(" ", "").startswith("v=DKIM1"):
                return r.encode("utf-8", "surrogateescape")
        return recs[0].encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# Organizational domains (RFC 7489 3.2) from the Public Suffix List shipped in publicsuffixlist
# ---------------------------------------------------------------------------------------------
_psl = None


def public_suffix_list():
    """The Public Suffix List, loaded once per process and shared by every plugin that needs
    it (DMARC's organizational domains, the DNSBL plugin's registered domains). Loading it
    takes about a quarter of a second, so the plugins that use it call this from their
    ``startup`` hook: the first message after a start or reload does not wait for it."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()  # the list shipped inside the package: no download
    return _psl


@functools.lru_cache(maxsize=8192)  # the same few domains come in message after message
def org_domain(domain: str) -> str:
    psl = public_suffix_list()
    domain = domain.lower().rstrip(".")
    if not domain:
        return ""
    try:
        od = psl.privatesuffix(domain)
    except Exception:  # noqa: BLE001 - odd labels: treat the name as its own org domain
        od = None
    return od or domain


# ---------------------------------------------------------------------------------------------
# Authentication-Results (RFC 8601)
# ---------------------------------------------------------------------------------------------
import re as _re  # noqa: E402

_COMMENT = _re.compile(r"\((?:[^()\\]|\\.)*\)")
_FIRST_WORD = _re.compile(r"\s*([^\s;]+)")
_UNSAFE = _re.compile(r'[\\"\r\n]')


def ar_authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value ("" when unreadable)."""
    v = value
    for _ in range(3):  # nested comments, cheaply
        v = _COMMENT.sub(" ", v)
    m = _FIRST_WORD.match(v)
    return m.group(1).strip('"').lower() if m else ""


def forged_ar_removals(raw: bytes, our_id: str) -> list:
    """Modifications removing every incoming Authentication-Results header that claims our
    authserv-id (RFC 8601 5: a sender must not be able to forge our verdicts)."""
    block, _sep, _body = split_message(raw)
    if b"authentication-results" not in block.lower():
        return []  # the common case, without walking the fields
    out = []
    seen = set()
    for f in header_fields(block):
        if field_name(f) != "authentication-results":
            continue
        value = field_value(f)
        if ar_authserv_id(value) == our_id.lower() and value not in seen:
            seen.add(value)
            out.append(Modification.remove_header("Authentication-Results", value))
    return out


# RFC 8601 2.2: a value is a token (RFC 2045) or a quoted-string; a pvalue may also be an address
_AR_TOKEN = _re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
_AR_UNPRINTABLE = _re.compile(r"[^\x20-\x7e]")
_AR_QUOTED = _re.compile(r'(["\\])')


def _ar_value(value: str) -> str:
    """A value as authres writes it: an address or a token as it is, else a quoted-string."""
    if "@" in value or _AR_TOKEN.fullmatch(value):
        return value
    return '"' + _AR_QUOTED.sub(r"\\\1", value) + '"'


def _ar_clause(method: str, result: str, comment: str | None = None, reason: str | None = None,
               props: tuple = ()) -> str:
    """One ``method=result (comment) reason=... ptype.property=value ...`` clause."""
    out = [method, "=", result.lower()]
    if comment:
        out.append(f" ({comment})")
    if reason:
        out.append(" reason=" + _ar_value(_AR_UNPRINTABLE.sub("?", reason)))
    for ptype, prop, value in props:
        if value:
            out.append(f" {ptype}.{prop}={_ar_value(value)}")
    return "".join(out)


def build_authres(ctx) -> str:
    """The value of our Authentication-Results header from the results in ``ctx.data``.

    Written here with authres' grammar and quoting (tests/test_auth_results.py checks that
    it equals authres' own output and that authres parses it back): building authres' objects
    cost a milter ~0.2 M instructions per message, most of it compiling regular expressions
    per value. authres still parses Authentication-Results (ARC, the tests)."""
    clauses = []
    spf = ctx.data.get("spf")
    if spf:
        mf, helo = spf.get("mailfrom"), spf.get("helo")
        if mf is not None:
            if mf.identity == "mailfrom":
                clauses.append(_ar_clause("spf", mf.result,
                                          props=(("smtp", "mailfrom", mf.sender),)))
            else:
                clauses.append(_ar_clause("spf", mf.result,
                                          props=(("smtp", "helo", ctx.session.helo),)))
        if helo is not None and helo is not mf:
            clauses.append(_ar_clause("spf", helo.result,
                                      props=(("smtp", "helo", ctx.session.helo),)))
    dkim = ctx.data.get("dkim")
    if dkim is not None:
        if not dkim:
            clauses.append(_ar_clause("dkim", "none"))
        for r in dkim:
            clauses.append(_ar_clause(
                "dkim", r.result, f"{r.bits}-bit key" if r.bits else None,
                _clean(r.reason) if r.reason and r.result != "pass" else None,
                (("header", "d", r.domain), ("header", "i", r.identity),
                 ("header", "a", r.algorithm), ("header", "s", r.selector),
                 ("header", "b", r.b_prefix))))
    dmarc = ctx.data.get("dmarc")
    if dmarc is not None:
        comment = None
        if dmarc.record:
            p = dmarc.record.get("p", "none")
            comment = (f"p={p.upper()} sp={dmarc.record.get('sp', p).upper()} "
                       f"dis={dmarc.disposition.upper()}")
        clauses.append(_ar_clause(
            "dmarc", dmarc.result, comment, _clean(dmarc.reason) if dmarc.reason else None,
            (("header", "from", dmarc.domain),
             ("policy", "dmarc", dmarc.policy if dmarc.result in ("pass", "fail") else None))))
    arc = ctx.data.get("arc")
    if arc is not None:
        clauses.append(_ar_clause(
            "arc", arc.result, None, _clean(arc.reason) if arc.result == "fail" else None,
            (("smtp", "remote-ip", ctx.session.peer_ip),
             ("header", "oldest-pass",
              str(arc.oldest_pass) if arc.result == "pass" and arc.oldest_pass else None))))
    return authserv_id(ctx.config) + "; " + ("; ".join(clauses) if clauses else "none")


def _clean(text: str) -> str:
    return _UNSAFE.sub(" ", text)[:200]
