"""ARC (RFC 8617): validates the ARC chain of every message (dkimpy's ARC, keys through
filterd's resolver) and, when configured, seals the message at the gateway (adds
ARC-Authentication-Results, ARC-Message-Signature and ARC-Seal over our Authentication-Results).
Result in ``ctx.data["arc"]`` (:class:`filterd.auth.ARCResult`) and symbols ARC_PASS / ARC_FAIL /
ARC_NONE. Runs after auth_results (see [plugins] order_last) so the seal covers our verdicts."""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import time

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from filterd.auth import (ARCResult, TXTPrefetch, authserv_id, build_authres,
                          forged_ar_removals)
from filterd.hookspecs import hookimpl
from filterd.rewrite import apply_modifications, split_message
from filterd.verdict import Modification

log = logging.getLogger("filterd.arc")

CONFIG = """
# Validate ARC chains (the result feeds Authentication-Results as arc=).
verify = true
# RSA keys shorter than this make a signature fail.
min_key_bits = 1024
# Seal messages passing through: "" = never; "inbound" = mail that is not ours (forwarded,
# e.g. after a mailing list); "all" = every message.
seal = ""  # one of: , inbound, all
# Sealing domain, selector and RSA key (PEM; `filterd dkim keygen` makes one).
domain = ""
selector = ""
key = ""
# Header fields covered by the ARC-Message-Signature when present.
sign_headers = ["from", "to", "cc", "subject", "date", "message-id", "reply-to",
                "mime-version", "content-type", "content-transfer-encoding",
                "in-reply-to", "references", "list-id"]
"""

SUGGESTED = {"pass": -0.3, "fail": 0.5, "none": 0.0}
_ARC_NAMES = (b"arc-seal", b"arc-message-signature")
_ARC_FIELD = re.compile(rb"(?im)^arc-(seal|message-signature|authentication-results)[ \t]*:")


def _text(b) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def _key_names(d: dkimpy.ARC) -> list[str]:
    names = []
    for n, v in d.headers:
        if n.lower() in _ARC_NAMES:
            try:
                tags = parse_tag_value(v)
            except InvalidTagValueList:
                continue
            s, dom = tags.get(b"s"), tags.get(b"d")
            if s and dom:
                names.append(f"{_text(s)}._domainkey.{_text(dom)}")
    return names


def _verify(d: dkimpy.ARC, prefetch: TXTPrefetch) -> tuple:
    try:
        return d.verify(dnsfunc=prefetch.dnsfunc)
    except dkimpy.DKIMException as exc:
        return dkimpy.CV_Fail, [], str(exc)
    except Exception as exc:  # noqa: BLE001 - hostile input must end in a result
        return dkimpy.CV_Fail, [], f"{type(exc).__name__}: {exc}"


async def validate(resolver, raw: bytes, min_key_bits: int = 1024) -> ARCResult:
    """The chain validation status of ``raw`` (RFC 8617 5.2): pass, fail or none."""
    if not _ARC_FIELD.search(split_message(raw)[0]):
        return ARCResult("none", "no ARC sets")  # without parsing the message for dkimpy
    try:
        d = dkimpy.ARC(raw, minkey=min_key_bits, logger=log)
    except Exception as exc:  # noqa: BLE001 - unparseable header block
        return ARCResult("fail", f"message not parseable for ARC: {exc}")
    if not any(n.lower() in _ARC_NAMES + (b"arc-authentication-results",)
               for n, _ in d.headers):
        return ARCResult("none", "no ARC sets")
    prefetch = TXTPrefetch()
    await prefetch.fetch(resolver, _key_names(d))
    cv, details, reason = await asyncio.to_thread(_verify, d, prefetch)
    # dkimpy returns None when a seal recorded cv=fail: the chain is failed (RFC 8617 5.2 step 2)
    result = {dkimpy.CV_Pass: "pass", dkimpy.CV_None: "none"}.get(cv, "fail")
    if result == "fail" and prefetch.failed:
        reason = f"{reason}; key lookup failed: {', '.join(sorted(prefetch.failed))}"
    res = ARCResult(result, reason if result != "pass" else "", len(details or []))
    res.terminated = cv is None
    res.details = details or []
    res.sealing_domains = [_text(x.get("as-domain", b"")) for x in reversed(res.details)]
    return res


_AR_ID = re.compile(rb"^\s*(?:\((?:[^()\\]|\\.)*\)\s*)*([^\s;(]+)[^;]*;", re.S)


class _Sealer(dkimpy.ARC):
    """dkimpy's ARC sealing with one fix: the ARC-Authentication-Results is built from our
    Authentication-Results headers *as written* (comments kept). dkimpy re-serializes them
    through authres, which drops comments such as "(1024-bit key)", so its AAR (and the seal
    over it) differs from what RFC 8617 4.1.1 asks for and from the ARC test suite."""

    def sign(self, selector, domain, privkey, srv_id, include_headers=None, timestamp=None,
             standardize=False):
        import authres

        D = dkimpy
        self.add_should_not(("Authentication-Results",))
        try:
            pk = D.parse_pem_private_key(privkey)
        except D.UnparsableKeyError as e:
            raise D.KeyFormatError(str(e))
        parts, results = [], []
        for name, value in self.headers:
            if name.lower() != b"authentication-results":
                continue
            m = _AR_ID.match(value)
            if not m or m.group(1).lower() != srv_id.lower():
                continue
            rest = value[m.end():].strip()
            if not rest or rest.lower() == b"none":
                continue
            parts.append(rest)
            try:
                results += authres.AuthenticationResultsHeader.parse(
                    "Authentication-Results: " + value.decode("utf-8", "replace")).results
            except Exception:  # noqa: BLE001 - unparseable results still get sealed as text
                pass
        if not parts:
            return []
        auth_results = srv_id + b"".join(b";" + self.linesep + b" " + p for p in parts)
        arc_results = [r for r in results if getattr(r, "method", "") == "arc"]
        if not arc_results:
            cv = D.CV_None
        elif len(arc_results) != 1:
            cv = D.CV_Fail
        else:
            cv = arc_results[0].result.lower().encode("utf-8")
        if include_headers is None:
            include_headers = self.default_sign_headers()
        include_headers = tuple(x.lower() for x in include_headers)
        self.include_headers = include_headers
        if b"from" not in include_headers:
            raise D.ParameterError("The From header field MUST be signed")
        for x in set(include_headers).intersection(self.should_not_sign):
            raise D.ParameterError("The %s header field SHOULD NOT be signed" % x)
        max_instance, arc_headers_w_instance = self.sorted_arc_headers()
        instance = max_instance + 1 if arc_headers_w_instance else 1
        if instance > 50:
            raise D.ParameterError("Maximum instance tag value exceeded")
        if instance == 1 and cv != D.CV_None:
            raise D.ParameterError("No existing chain found on message, cv should be none")
        if instance != 1 and cv == D.CV_None:
            return []
        arc_headers = [y for x, y in arc_headers_w_instance] if cv != D.CV_Fail else []
        new_arc_set = []
        aar_value = ("i=%d; " % instance).encode() + auth_results.rstrip() + self.linesep
        canon = D.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        new_arc_set.append(b"ARC-Authentication-Results: " + aar_value)
        arc_headers.insert(0, (b"ARC-Authentication-Results", aar_value))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers
        self.hasher = D.HASH_ALGORITHMS[self.signature_algorithm]
        h = D.HashThrough(self.hasher(), self.debug_content)
        h.update(canon.canonicalize_body(self.body))
        bodyhash = base64.b64encode(h.digest())
        ts = str(timestamp or int(time.time())).encode("ascii")
        ams_fields = [(b"i", str(instance).encode()), (b"a", self.signature_algorithm),
                      (b"c", b"relaxed/relaxed"), (b"d", domain), (b"s", selector),
                      (b"t", ts), (b"h", b" : ".join(include_headers)), (b"bh", bodyhash),
                      (b"b", b"0" * 60)]
        res = self.gen_header(ams_fields, include_headers, canon, b"ARC-Message-Signature", pk,
                              standardize)
        new_arc_set.append(b"ARC-Message-Signature: " + res)
        arc_headers.insert(0, (b"ARC-Message-Signature", res))
        self.headers = canon.canonicalize_headers(arc_headers[:1]) + self.headers
        as_fields = [(b"i", str(instance).encode()), (b"cv", cv),
                     (b"a", self.signature_algorithm), (b"d", domain), (b"s", selector),
                     (b"t", ts), (b"b", b"0" * 60)]
        as_include = [x[0].lower() for x in arc_headers]
        as_include.reverse()
        if cv == D.CV_Fail:
            self.headers.reverse()
        res = self.gen_header(as_fields, as_include, canon, b"ARC-Seal", pk, standardize)
        new_arc_set.append(b"ARC-Seal: " + res)
        new_arc_set.reverse()
        return new_arc_set


def seal(raw: bytes, domain: str, selector: str, key: bytes, srv_id: str, headers=None,
         timestamp=None, only_present: bool = True, standardize: bool = False
         ) -> list[tuple[str, str]]:
    """The ARC set (name, unfolded value) for ``raw``, which must carry our
    Authentication-Results under ``srv_id``. [] when dkimpy decides the chain ends here.
    ``headers`` are signed in the AMS (only those present unless ``only_present`` is False).
    ``standardize`` is dkimpy's canonical tag layout (sorted tags, h= without spaces), which the
    ARC test suite's expected signatures use."""
    d = _Sealer(raw, logger=log)
    present = {n.lower() for n, _ in d.headers}
    include = [h.lower().encode() for h in (headers or [])
               if (h.lower().encode() in present or not only_present)
               and h.lower().encode() not in d.should_not_sign]
    if b"from" not in include:
        include.insert(0, b"from")
    out = d.sign(selector.encode(), domain.encode(), key, srv_id.encode(),
                 include_headers=include, timestamp=timestamp, standardize=standardize)
    pairs = []
    for h in out:
        name, _, value = h.decode("ascii", "replace").partition(":")
        pairs.append((name, re.sub(r"\r?\n[ \t]*", " ", value).strip()))
    return pairs


class Plugin:
    """ARC chain validation and sealing."""

    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.key: bytes | None = None

    def idle_hooks(self) -> set[str]:
        o = self.options
        return ({"data"} if not o.get("verify", True) else set()) | \
            ({"modify"} if not o.get("seal") or self.key is None else set())

    @hookimpl
    def startup(self, options, services):
        if not options.get("seal"):
            return
        missing = [k for k in ("domain", "selector", "key") if not options.get(k)]
        if missing:
            raise ValueError(f"[arc] seal = {options['seal']!r} needs "
                             f"{', '.join(missing)} set")
        try:
            with open(options["key"], "rb") as f:
                self.key = f.read()
        except OSError as exc:
            raise ValueError(f"[arc] key {options['key']}: {exc.strerror}") from exc

    @hookimpl(tryfirst=True)  # before the plugins that use auth results (reputation ...)
    async def data(self, ctx, message, options):
        if not options.get("verify", True):
            return None
        res = ctx.data.get("arc")  # DMARC may have validated already (trusted sealers)
        if res is None:
            res = await validate(ctx.services.dns, message.raw,
                                 int(options.get("min_key_bits", 1024)))
            ctx.data["arc"] = res
        ctx.add_symbol(f"ARC_{res.result.upper()}", SUGGESTED[res.result],
                       res.sealing_domains[-3:],
                       f"ARC chain {res.result}" + (f": {res.reason}" if res.reason else ""),
                       source="arc")
        return None

    @hookimpl
    async def modify(self, ctx, message, options):
        mode = options.get("seal")
        if not mode or self.key is None:
            return None
        from filterd.auth import is_outbound

        if mode == "inbound" and is_outbound(ctx):
            return None
        srv_id = authserv_id(ctx.config)
        pending = list(ctx.pending_modifications)
        ar_value = ctx.data.get("auth_results") or build_authres(ctx)
        if not any(m.kind == "add_header" and m.name.lower() == "authentication-results"
                   and m.value == ar_value for m in pending):
            pending += forged_ar_removals(message.raw, srv_id)
            pending.append(Modification.add_header("Authentication-Results", ar_value))
        raw = apply_modifications(message.raw, pending)
        try:
            arc_set = await asyncio.to_thread(seal, raw, options["domain"], options["selector"],
                                              self.key, srv_id, options.get("sign_headers"))
        except Exception as exc:  # noqa: BLE001 - never lose a message over a seal
            ctx.errors.append(f"arc: sealing as {options['domain']} failed: {exc}")
            ctx.add_symbol("ARC_SEAL_ERROR", 0.0, [options["domain"]], str(exc), source="arc")
            return None
        ctx.data["arc.sealed"] = [n for n, _ in arc_set]
        return [Modification.add_header(n, v) for n, v in arc_set]
