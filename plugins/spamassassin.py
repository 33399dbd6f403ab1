"""SpamAssassin: sends each message to spamd (aiospamc, REPORT) → SPAMASSASSIN symbol with spamd's
score and SA_<RULE> symbols for the rules that hit; spamd down or slow → configured policy."""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from filterd.config import parse_duration, parse_size
from filterd.hookspecs import hookimpl
from filterd.verdict import Verdict

log = logging.getLogger("filterd.spamassassin")

CONFIG = """
# Off by default: it needs a running spamd (Debian: apt-get install spamd).
enabled = false
# Where spamd listens: host and port, or a Unix socket (socket wins when set).
host = "127.0.0.1"
port = 783
socket = ""
# spamd user to scan as ("" = spamd's default).
user = ""
# Time for one spamd request (connect + scan). Keep it below the plugin timeout ([plugins]
# timeout, 10s by default) so this plugin's own policy applies.
spamd_timeout = "8s"
# spamd down, refusing or slower than spamd_timeout: "skip" records the symbol
# SPAMASSASSIN_UNAVAILABLE and goes on without SpamAssassin; "tempfail" defers the message (451).
on_unavailable = "skip"  # one of: skip, tempfail
# Messages larger than this are not sent to spamd (symbol SPAMASSASSIN_SKIPPED_SIZE).
max_size = "512K"
# The SPAMASSASSIN symbol's weight is spamd's score times this factor (0 = report only).
score_factor = 1.0
# Also report each rule that hit as SA_<RULE> (weight 0 unless set in [scores]).
rule_symbols = true
# An unexpected error inside this plugin skips it (symbol PLUGIN_ERROR) rather than deferring
# mail: SpamAssassin is one opinion among several.
on_error = "skip"
"""

_RULE_LINE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]{2,60})\s+(.*)$")


def parse_report(text: str) -> list[tuple[str, float, str]]:
    """(rule, points, description) from spamd's REPORT body (the table after the
    ``---- ----`` ruler)."""
    rules = []
    in_table = False
    last = None
    for line in text.splitlines():
        if line.startswith("----"):
            in_table = True
            continue
        if not in_table:
            continue
        m = _RULE_LINE.match(line)
        if m:
            last = [m.group(2), float(m.group(1)), m.group(3).strip()]
            rules.append(last)
        elif line.strip() and last is not None and line.startswith(" "):
            last[2] += " " + line.strip()  # continued description
        elif not line.strip() and rules:
            break
    return [tuple(r) for r in rules]


class Plugin:
    def __init__(self, options, services):
        self.options = options

    @hookimpl
    def startup(self, options):
        import aiospamc  # noqa: F401 - fail at start, with the name, when it is missing

        parse_duration(options["spamd_timeout"])
        parse_size(options["max_size"])

    def where(self, options) -> str:
        if options.get("socket"):
            return f"spamd unix:{options['socket']}"
        return f"spamd {options['host']}:{options['port']}"

    async def scan(self, raw: bytes, options):
        import aiospamc

        timeout = parse_duration(options["spamd_timeout"])
        kw = {"timeout": aiospamc.Timeout(total=timeout, connection=min(timeout, 5.0),
                                          response=timeout)}
        if options.get("socket"):
            kw["socket_path"] = Path(options["socket"])
            kw["host"] = None
        else:
            kw["host"], kw["port"] = options["host"], int(options["port"])
        if options.get("user"):
            kw["user"] = options["user"]
        return await asyncio.wait_for(aiospamc.report(raw, **kw), timeout + 1)

    @hookimpl
    async def data(self, ctx, message, options):
        where = self.where(options)
        if message.size > parse_size(options["max_size"]):
            ctx.add_symbol("SPAMASSASSIN_SKIPPED_SIZE", 0.0, [str(message.size)],
                           f"message larger than [spamassassin] max_size {options['max_size']}",
                           source="spamassassin")
            return None
        try:
            resp = await self.scan(message.raw, options)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any spamd/transport failure: apply the policy
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, asyncio.TimeoutError):
                why = f"no answer within {options['spamd_timeout']}"
            log.warning("%s unavailable for id=%s (%s); policy %s", where, ctx.transaction.id,
                        why, options["on_unavailable"])
            ctx.add_symbol("SPAMASSASSIN_UNAVAILABLE", 0.0, [where],
                           f"{where} unavailable: {why}", source="spamassassin")
            if options["on_unavailable"] == "tempfail":
                return Verdict.tempfail(
                    "Temporary local problem (spam scanner unavailable); please try again later",
                    code=451, enhanced="4.3.0", source="spamassassin")
            return None
        spam = resp.headers.get("Spam")
        score = float(getattr(spam, "score", 0.0) or 0.0)
        threshold = float(getattr(spam, "threshold", 0.0) or 0.0)
        rules = parse_report(bytes(resp.body).decode("utf-8", "replace"))
        ctx.add_symbol("SPAMASSASSIN", round(score * float(options["score_factor"]), 3),
                       [f"score={score:g}", f"required={threshold:g}"] + [r for r, _, _ in rules],
                       f"SpamAssassin score {score:g} (spamd says {threshold:g} is spam)",
                       source="spamassassin")
        ctx.data["spamassassin"] = {"score": score, "threshold": threshold,
                                    "is_spam": bool(getattr(spam, "value", False)),
                                    "rules": {r: p for r, p, _ in rules}}
        if options.get("rule_symbols", True):
            for rule, pts, desc in rules:
                ctx.add_symbol("SA_" + rule, 0.0, [f"{pts:g}"], desc, source="spamassassin")
        return None
