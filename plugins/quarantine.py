"""Quarantine: registers the quarantine service (``services.extra["quarantine"]``) that the
gateway and the milter call to hold messages, serves the quarantine web pages when
``[quarantine] web_listen`` is set, performs release-by-mail commands sent to sub-addresses of
``[quarantine] command_address``, and applies each user's always-allow / always-block senders
in ``decide``. Settings: ``[quarantine]`` (filterd/quarantine/config.toml, off by default)."""
from __future__ import annotations

import email.utils
import logging
import time
from importlib import resources

from filterd.hookspecs import hookimpl
from filterd.verdict import Action, Verdict

log = logging.getLogger("filterd.quarantine")

# The [quarantine] settings, annotated: filterd/quarantine/config.toml.
CONFIG = resources.files("filterd.quarantine").joinpath("config.toml").read_text(encoding="utf-8")

# Outcomes an allow-list entry may lift: the ones that come from the spam score, not a virus
# scanner's or a policy plugin's explicit verdict.
_LIFTABLE = (Action.QUARANTINE, Action.ADD_HEADER, Action.REWRITE_SUBJECT, Action.REJECT,
             Action.DISCARD)


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.service = None
        self.web = None
        self._cache: dict[str, tuple[set, set]] = {}
        self._version = None
        self._checked = 0.0
        self._local = 0

    async def _lists(self, recipient: str) -> tuple[set, set]:
        """(allow, block) of a recipient. Cached per process; a change anywhere (any node) bumps
        a version key in the store, checked at most every 2 seconds, so the hot path costs one
        store read every 2 s instead of two per recipient."""
        qs = self.service.qstore
        now = time.monotonic()
        if now - self._checked > 2.0 or qs.list_changes != self._local:
            self._checked, self._local = now, qs.list_changes
            version = await qs.lists_version()
            if version != self._version or len(self._cache) > 50000:
                self._cache.clear()
                self._version = version
        key = recipient.lower()
        if key not in self._cache:
            self._cache[key] = (await qs.list_get("allow", key), await qs.list_get("block", key))
        return self._cache[key]

    @hookimpl
    async def startup(self, services):
        from filterd.quarantine import QuarantineService

        self.service = QuarantineService(services.config, services)
        services.extra["quarantine"] = self.service
        listen = self.options.get("web_listen") or ""
        if listen and not services.extra.get("quarantine_web"):
            from filterd.web import QuarantineWeb

            web = QuarantineWeb(self.service)
            try:
                await web.start(listen)
            except OSError as exc:
                # `filterd check` and CLI commands load the same config while the daemon runs
                log.error("quarantine web pages NOT served: cannot listen on %s "
                          "([quarantine] web_listen): %s", listen, exc.strerror or exc)
            else:
                self.web = web
                services.extra["quarantine_web"] = web

    @hookimpl
    async def shutdown(self, services):
        if self.web is not None:
            await self.web.stop()
            services.extra.pop("quarantine_web", None)
            self.web = None

    # -- release by mail ----------------------------------------------------------------------
    @hookimpl
    def rcpt_to(self, ctx, recipient):
        token = self.service.command_token(recipient.address) if self.service else None
        if token is None:
            return None
        ctx.data.setdefault("quarantine_commands", {})[recipient.address] = token
        return Verdict.accept("quarantine command address", source="quarantine")

    @hookimpl
    async def data(self, ctx, message):
        commands = ctx.data.get("quarantine_commands")
        if not commands:
            return
        from filterd.quarantine import ActionError

        results = ctx.data.setdefault("quarantine_command_results", {})
        for addr, token in commands.items():
            try:
                results[addr] = await self.service.mail_command(
                    token, ctx.transaction.mail_from, message.parsed.header("From"))
            except ActionError as exc:
                results[addr] = f"refused: {exc}"
        return

    # -- decide: command mails end here; allow/block lists ------------------------------------
    @hookimpl
    async def decide(self, ctx):
        out: dict[str, Verdict] = {}
        results = ctx.data.get("quarantine_command_results") or {}
        for addr in ctx.data.get("quarantine_commands") or {}:
            out[addr] = Verdict.discard(f"quarantine command: {results.get(addr, 'not run')}",
                                        source="quarantine")
        if self.service is None:
            return out or None
        marks = (ctx.message.parsed.get_all(self.service.RELEASE_HEADER)
                 if ctx.message is not None else [])
        for r in ctx.recipients if marks else ():
            if r.address not in out and r.verdict.action in _LIFTABLE and \
                    r.verdict.source == "score" and \
                    any(self.service.check_release_header(str(m), r.address) for m in marks):
                out[r.address] = Verdict.accept("released from quarantine", source="quarantine")
        if not self.options.get("honour_lists"):
            return out or None
        senders = {ctx.transaction.mail_from.lower()} if ctx.transaction.mail_from else set()
        if ctx.message is not None:
            a = email.utils.parseaddr(ctx.message.parsed.header("From"))[1].lower()
            if a:
                senders.add(a)
        if not senders:
            return out or None
        keys = senders | {"@" + s.rpartition("@")[2] for s in senders}
        for r in ctx.recipients:
            if r.address in out:
                continue
            allow, block = await self._lists(r.address)
            if keys & block:
                if not r.verdict.action.refuses:
                    out[r.address] = Verdict.reject("Sender blocked by the recipient",
                                                    code=550, enhanced="5.7.1",
                                                    source="quarantine")
            elif keys & allow:
                if r.verdict.action in _LIFTABLE and r.verdict.source == "score":
                    out[r.address] = Verdict.accept("sender on the recipient's allow list",
                                                    source="quarantine")
        return out or None
