"""DKIM (RFC 6376, RFC 8463): verifies every DKIM-Signature (RSA and ed25519) with dkimpy, keys
fetched through filterd's resolver; signs our own mail (authenticated clients and
``[auth] internal_networks``) with the key configured for the From domain. Results go to
``ctx.data["dkim"]`` (a list of :class:`filterd.auth.DKIMResult`) and symbols DKIM_PASS /
DKIM_FAIL / DKIM_PERMERROR / DKIM_TEMPERROR / DKIM_NONE."""
from __future__ import annotations

import asyncio
import base64
import logging
import re

import dkim as dkimpy
from dkim.util import InvalidTagValueList, parse_tag_value

from filterd.auth import DKIMResult, TXTPrefetch, is_outbound
from filterd.hookspecs import hookimpl
from filterd.rewrite import apply_modifications, split_message
from filterd.verdict import Modification

log = logging.getLogger("filterd.dkim")

CONFIG = """
[dkim]
# Verify the DKIM signatures of every message (results feed DMARC and Authentication-Results).
verify = true
# At most this many signatures are verified per message (the rest are reported as neutral).
max_signatures = 10
# RSA keys shorter than this fail (RFC 8301: at least 1024).
min_key_bits = 1024
# Accept rsa-sha1 signatures (RFC 8301 says verifiers must not; only for old senders).
accept_rsa_sha1 = false
# Keys longer than this are refused (permerror) so a hostile key cannot cost much CPU.
max_key_bits = 8192
# Sign our own mail (authenticated clients, [auth] internal_networks) when the From domain (or
# a parent of it) has an entry in [dkim.domains].
sign = true
# Canonicalization header/body. The header part is always relaxed (our header writer unfolds).
canonicalization = "relaxed/relaxed"  # one of: relaxed/relaxed, relaxed/simple
# Header fields signed when present.
sign_headers = ["from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
                "mime-version", "content-type", "content-transfer-encoding", "content-id",
                "content-description", "in-reply-to", "references", "list-id", "list-help",
                "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
                "list-owner", "list-archive"]
# Header fields also signed once more than present ("oversigned"), so nobody can add one.
oversign_headers = ["from", "sender", "reply-to", "subject", "date", "to", "cc",
                    "content-type", "mime-version"]

# Signing keys per domain:
#   [dkim.domains."example.com"]
#   selector = "s2026"
#   key = "/etc/filterd/dkim/example.com.s2026.key"   # made by `filterd dkim keygen`
#   algorithm = "rsa-sha256"                          # or "ed25519-sha256"
[dkim.domains]
"*" = { selector = "", key = "", algorithm = "" }
"""

SUGGESTED = {"pass": -0.2, "fail": 1.0, "permerror": 0.5, "temperror": 0.0, "neutral": 0.0,
             "none": 0.0}


def _text(b) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def _key_bits(record: str) -> tuple[str, int]:
    """(k= algorithm, upper bound of the key size in bits) from a DKIM key record, without
    parsing the key (cheap, to refuse hostile keys before any arithmetic)."""
    try:
        tags = parse_tag_value(record.encode("utf-8", "surrogateescape"))
    except InvalidTagValueList:
        return "rsa", 0
    k = _text(tags.get(b"k", b"rsa")).lower()
    p = re.sub(r"\s+", "", _text(tags.get(b"p", b"")))
    try:
        der = base64.b64decode(p + "=" * (-len(p) % 4))
    except (ValueError, TypeError):
        return k, 0
    return k, len(der) * 8 if k == "rsa" else 256


def _verify_one(d: dkimpy.DKIM, idx: int, prefetch: TXTPrefetch, minkey: int) -> tuple[str, str]:
    try:
        ok = d.verify(idx=idx, dnsfunc=prefetch.dnsfunc)
    except dkimpy.ValidationError as exc:
        msg = str(exc)
        return ("fail" if "body hash mismatch" in msg else "permerror"), msg
    except dkimpy.KeyFormatError as exc:
        return "permerror", f"bad key: {exc}"
    except dkimpy.DKIMException as exc:
        return "permerror", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a library crash on hostile input: RFC permerror
        return "permerror", f"unverifiable signature: {type(exc).__name__}: {exc}"
    return ("pass", "") if ok else ("fail", "signature did not verify")


_SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:")


async def verify_message(resolver, raw: bytes, min_key_bits: int = 1024,
                         max_key_bits: int = 8192, max_signatures: int = 10,
                         accept_rsa_sha1: bool = False) -> list[DKIMResult]:
    """Verify every DKIM-Signature of ``raw`` (top to bottom). Never raises: each signature
    ends in pass, fail, neutral, temperror or permerror."""
    if not _SIGNATURE_FIELD.search(split_message(raw)[0]):
        return []  # unsigned: nothing to verify (dkimpy's parse of the message is not needed)
    try:
        d = dkimpy.DKIM(raw, minkey=min_key_bits, logger=log)
    except Exception as exc:  # noqa: BLE001 - unparseable header block
        return [DKIMResult("permerror", reason=f"message not parseable for DKIM: {exc}")]
    sigs = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    results: list[DKIMResult] = []
    plan = []
    for idx, value in enumerate(sigs):
        r = DKIMResult("permerror")
        results.append(r)
        if idx >= max_signatures:
            r.result, r.reason = "neutral", f"more than {max_signatures} signatures; not checked"
            continue
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList as exc:
            r.reason = f"malformed signature tags: {exc}"
            continue
        r.domain = _text(tags.get(b"d", b"")).lower()
        r.selector = _text(tags.get(b"s", b""))
        r.identity = _text(tags.get(b"i", b""))
        r.algorithm = _text(tags.get(b"a", b""))
        r.b_prefix = re.sub(r"\s+", "", _text(tags.get(b"b", b"")))[:8]
        if not r.domain or not r.selector:
            r.reason = "signature lacks d= or s="
            continue
        plan.append((idx, r, f"{r.selector}._domainkey.{r.domain}"))
    prefetch = TXTPrefetch()
    await prefetch.fetch(resolver, [name for _, _, name in plan])
    for idx, r, name in plan:
        if name in prefetch.failed:
            r.result, r.reason = "temperror", f"key lookup {name} failed: {prefetch.failed[name]}"
            continue
        record = prefetch.dnsfunc(name)
        if record is None:
            r.result, r.reason = "permerror", f"no key published at {name}"
            continue
        k, rough = _key_bits(_text(record))
        if rough > max_key_bits + 512:
            r.result, r.reason = "permerror", f"key at {name} too large (about {rough} bits)"
            continue
        try:
            _pk, bits, _ktag, _tls = dkimpy.evaluate_pk(name, record)
        except Exception as exc:  # noqa: BLE001 - KeyFormatError and worse on hostile records
            r.result, r.reason = "permerror", f"bad key record at {name}: {exc}"
            continue
        r.bits = bits or 0
        if r.bits > max_key_bits:
            r.result, r.reason = "permerror", f"key at {name} too large ({r.bits} bits)"
            continue
        if r.algorithm.lower() == "rsa-sha1" and not accept_rsa_sha1:
            r.result, r.reason = "permerror", "rsa-sha1 signatures are not accepted (RFC 8301)"
            continue
        r.result, r.reason = await asyncio.to_thread(_verify_one, d, idx, prefetch, min_key_bits)
    return results


def sign_message(raw: bytes, domain: str, selector: str, key: bytes, algorithm: str = "rsa-sha256",
                 canonicalization: str = "relaxed/relaxed", headers=None, oversign=None) -> str:
    """The DKIM-Signature header *value* (unfolded) for ``raw``. Raises dkimpy's
    DKIMException on a bad key."""
    d = dkimpy.DKIM(raw, signature_algorithm=algorithm.encode(), logger=log)
    present = [n.lower() for n, _ in d.headers]
    wanted = [h.lower() for h in (headers or []) if h.lower().encode() not in d.should_not_sign]
    include = [n for n in reversed(present) if n.decode() in wanted]
    # each present field once per occurrence, then once more for oversigned ones
    seen: dict[bytes, int] = {}
    for n in include:
        seen[n] = seen.get(n, 0) + 1
    include = []
    for n, count in seen.items():
        include += [n] * count
    for h in oversign or []:
        hb = h.lower().encode()
        if hb in seen or hb == b"from":
            include.append(hb)
    if b"from" not in include:
        include.insert(0, b"from")
    c_head, _, c_body = canonicalization.partition("/")
    sig = d.sign(selector.encode(), domain.encode(), key,
                 canonicalize=(b"relaxed", (c_body or "relaxed").encode()),
                 include_headers=include)
    name, _, value = sig.decode("ascii").partition(":")
    return re.sub(r"\r?\n[ \t]*", " ", value).strip()


class Plugin:
    """DKIM: verify every signature, sign our own mail per From domain."""

    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.keys: dict[str, dict] = {}

    def idle_hooks(self) -> set[str]:
        o = self.options
        return ({"data"} if not o.get("verify", True) else set()) | \
            ({"modify"} if not o.get("sign", True) or not self.keys else set())

    @hookimpl
    def startup(self, options, services):
        """Load every signing key now: a missing or unreadable key is a start-up error naming
        the domain and file, not a surprise on the first message."""
        for domain, entry in (options.get("domains") or {}).items():
            if domain == "*" or not entry or not any(entry.values()):
                continue
            sel, path = entry.get("selector"), entry.get("key")
            if not sel or not path:
                raise ValueError(f"[dkim.domains.\"{domain}\"] needs selector and key "
                                 f"(got selector={sel!r}, key={path!r})")
            try:
                with open(path, "rb") as f:
                    key = f.read()
            except OSError as exc:
                raise ValueError(f"[dkim.domains.\"{domain}\"] key {path}: {exc.strerror}; "
                                 f"create one with: filterd dkim keygen --domain {domain} "
                                 f"--selector {sel}") from exc
            alg = entry.get("algorithm") or ("ed25519-sha256" if b"PRIVATE KEY" not in key
                                             else "rsa-sha256")
            if alg.startswith("ed25519"):
                key = key.strip()
            self.keys[domain.lower().rstrip(".")] = {"selector": sel, "key": key,
                                                     "algorithm": alg, "path": path}

    def signer_for(self, from_domain: str) -> tuple[str, dict] | None:
        d = from_domain.lower().rstrip(".")
        while d:
            if d in self.keys:
                return d, self.keys[d]
            if "." not in d:
                break
            d = d.split(".", 1)[1]
        return None

    @hookimpl(tryfirst=True)  # before the plugins that use auth results (reputation ...)
    async def data(self, ctx, message, options):
        if not options.get("verify", True):
            return None
        results = await verify_message(ctx.services.dns, message.raw,
                                       int(options.get("min_key_bits", 1024)),
                                       int(options.get("max_key_bits", 8192)),
                                       int(options.get("max_signatures", 10)),
                                       bool(options.get("accept_rsa_sha1", False)))
        ctx.data["dkim"] = results
        if not results:
            ctx.add_symbol("DKIM_NONE", SUGGESTED["none"], description="no DKIM signature",
                           source="dkim")
        for r in results:
            ctx.add_symbol(f"DKIM_{r.result.upper()}", SUGGESTED[r.result],
                           options=[f"{r.domain or '?'}:{r.selector or '?'}"],
                           description=f"DKIM {r.result} d={r.domain} s={r.selector}"
                                       + (f": {r.reason}" if r.reason else ""),
                           source="dkim")
        return None

    @hookimpl
    async def modify(self, ctx, message, options):
        if not options.get("sign", True) or not self.keys or not is_outbound(ctx):
            return None
        from_domain = message.parsed.from_domain
        found = self.signer_for(from_domain) if from_domain else None
        if found is None:
            return None
        domain, entry = found
        raw = apply_modifications(message.raw, list(ctx.pending_modifications))
        try:
            value = await asyncio.to_thread(
                sign_message, raw, domain, entry["selector"], entry["key"], entry["algorithm"],
                options.get("canonicalization", "relaxed/relaxed"),
                options.get("sign_headers"), options.get("oversign_headers"))
        except Exception as exc:  # noqa: BLE001 - never lose the message over a signature
            ctx.errors.append(f"dkim: signing for {domain} with {entry['path']} failed: {exc}")
            ctx.add_symbol("DKIM_SIGN_ERROR", 0.0, [domain], str(exc), source="dkim")
            return None
        ctx.data["dkim.signed"] = {"domain": domain, "selector": entry["selector"]}
        return [Modification.add_header("DKIM-Signature", value)]
