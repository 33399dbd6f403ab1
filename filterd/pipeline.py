"""The pipeline: filterd's policy, top to bottom.

Every front door (SMTP listener, before-queue proxy, milter, ``filterd check``) drives the same
:class:`Pipeline` and turns what it returns into protocol replies. Nothing here knows about
sockets.

    connect(session)                     → Verdict | None    (first non-None plugin verdict)
    helo(session, name)                  → Verdict | None
    begin(session)                       → ScanContext       (one per MAIL transaction)
    mail_from(ctx, sender, params)       → Verdict | None
    rcpt_to(ctx, address, params)        → Verdict           (per recipient; accepted ones are
                                                              added to ctx.transaction)
    data(ctx, raw)                       → ScanResult:
        1. content scan   — every plugin's ``data`` hook adds symbols / verdicts
        2. scoring        — per recipient: message symbols + its own symbols → total score
                            → action through the thresholds that apply to that recipient
        3. decide         — ``decide`` hooks may override outcomes (allow/block lists ...)
        4. modify         — ``modify`` hooks return header/subject/body changes
        5. scanned        — event with the result, for tracing and learning
    delivered / bounced / quarantined    → events for tracking and learning

Outcomes are per recipient. When sources disagree about one recipient, the most severe wins
(see :class:`filterd.verdict.Action`), except that ``decide`` hooks replace outcomes outright.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

from . import config as config_mod
from .model import Message, Recipient, Session, Transaction
from .plugin_host import PluginHost, discover
from .rewrite import apply_modifications
from .services import Services
from .symbols import ActionPolicy, ScoreTable, SymbolSet
from .verdict import Action, Modification, Verdict

log = logging.getLogger("filterd.pipeline")


class ScanContext:
    """Everything plugins see about one transaction (the ``ctx`` argument of every hook)."""

    def __init__(self, pipeline: "Pipeline", session: Session, transaction: Transaction):
        self.pipeline = pipeline
        self.session = session
        self.transaction = transaction
        self.message: Message | None = None
        self.services: Services = pipeline.services
        self.config = pipeline.config
        self.symbols = SymbolSet(pipeline.scores)
        self.rcpt_symbols: dict[str, SymbolSet] = {}
        self.modifications: list[Modification] = []
        self.pending_modifications: list[Modification] = []  # during modify: changes so far
        self.errors: list[str] = []
        self.data: dict = {}  # scratch space shared by plugins for this transaction

    # -- reporting --------------------------------------------------------------------------
    def add_symbol(self, name: str, score: float | None = None, options: Iterable = (),
                   description: str = "", recipient: str | None = None, source: str = ""):
        """Report a finding. ``score`` is the suggested weight; ``[scores]`` config overrides it.
        With ``recipient`` the symbol counts for that recipient only."""
        if recipient:
            target = self.rcpt_symbols.setdefault(recipient.lower(),
                                                  SymbolSet(self.pipeline.scores))
        else:
            target = self.symbols
        return target.add(name, score, list(options or ()), description, source)

    def set_verdict(self, verdict: Verdict, recipient: str | None = None) -> None:
        """Set an outcome for one recipient, or for all; the more severe outcome wins."""
        for r in self.recipients:
            if recipient is None or r.address.lower() == recipient.lower():
                r.verdict = verdict.worse(r.verdict)

    @property
    def recipients(self) -> list[Recipient]:
        return self.transaction.recipients

    def has_symbol(self, name: str, recipient: str | None = None) -> bool:
        if name in self.symbols:
            return True
        return bool(recipient) and name in self.rcpt_symbols.get(recipient.lower(), ())

    def all_symbols(self, recipient: str | None = None) -> list:
        syms = list(self.symbols)
        if recipient:
            syms += list(self.rcpt_symbols.get(recipient.lower(), ()))
        return syms

    def score_for(self, recipient: str | None = None) -> float:
        total = self.symbols.total
        if recipient and recipient.lower() in self.rcpt_symbols:
            total += self.rcpt_symbols[recipient.lower()].total
        return round(total, 3)

    def action_for(self, recipient: str | None = None) -> Action:
        return self.pipeline.policy.action_for(self.score_for(recipient), recipient)


@dataclass
class RecipientOutcome:
    address: str
    action: Action
    score: float
    verdict: Verdict

    def to_dict(self) -> dict:
        d = {"action": self.action.value, "score": self.score}
        d.update({k: v for k, v in self.verdict.to_dict().items() if k != "action"})
        return d


@dataclass
class ScanResult:
    """The outcome of the data phase, per recipient, plus what would change in the message."""

    ctx: ScanContext
    outcomes: dict[str, RecipientOutcome]
    modifications: list[Modification] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def action(self) -> Action:
        """The most severe action over all recipients."""
        if not self.outcomes:
            return Action.ACCEPT
        return max((o.action for o in self.outcomes.values()), key=lambda a: a.severity)

    @property
    def score(self) -> float:
        return self.ctx.score_for(None)

    @property
    def symbols(self) -> list:
        return sorted(self.ctx.symbols, key=lambda s: (-abs(s.score), s.name))

    @property
    def added_headers(self) -> list[tuple[str, str]]:
        return [(m.name, m.value) for m in self.modifications if m.kind == "add_header"]

    def message_bytes(self) -> bytes:
        """The message as it should leave filterd (modifications applied)."""
        assert self.ctx.message is not None
        return apply_modifications(self.ctx.message.raw, self.modifications)

    def recipients_with(self, *actions: Action) -> list[str]:
        return [a for a, o in self.outcomes.items() if o.action in actions]

    def to_dict(self) -> dict:
        rcpt_syms = {a: [s.to_dict() for s in ss]
                     for a, ss in self.ctx.rcpt_symbols.items() if len(ss)}
        d = {
            "action": self.action.value,
            "score": self.score,
            "symbols": [s.to_dict() for s in self.symbols],
            "recipients": {a: o.action.value for a, o in self.outcomes.items()},
            "recipient_details": {a: o.to_dict() for a, o in self.outcomes.items()},
            "headers": [{"name": n, "value": v} for n, v in self.added_headers],
            "modifications": [{"kind": m.kind, "name": m.name, "value": m.value}
                              for m in self.modifications if m.kind != "add_header"],
            "queue_id": self.ctx.transaction.id,
        }
        if rcpt_syms:
            d["recipient_symbols"] = rcpt_syms
        if self.ctx.errors:
            d["errors"] = list(self.ctx.errors)
        if self.ctx.message is not None and self.ctx.message.parsed.defects:
            d["defects"] = sorted(set(self.ctx.message.parsed.defects))[:50]
        return d


class Pipeline:
    """One configured pipeline: config, services, plugin host, scoring policy."""

    def __init__(self, config: config_mod.Config, host: PluginHost, services: Services):
        self.config = config
        self.host = host
        self.services = services
        self.rules_scores, self.rules_actions = {}, {}
        self.reload_policy()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    async def create(cls, config_path: str | None = None, overrides: Iterable[str] = (),
                     use_default_path: bool = True, resolver=None, store=None) -> "Pipeline":
        """Load config and plugins, start them. Raises ConfigError/PluginError with details."""
        config, infos = load_config_and_plugins(config_path, overrides, use_default_path)
        services = Services(config, resolver=resolver, store=store)
        host = PluginHost(config, infos, services)
        pipe = cls(config, host, services)
        services.extra["pipeline"] = pipe
        await host.startup()
        return pipe

    def reload_policy(self) -> None:
        """(Re)build score table and thresholds: shipped/site rule files, then config."""
        from .rules import load_policy_tables

        scores, actions = load_policy_tables(self.config)
        self.scores = ScoreTable(scores)
        self.policy = ActionPolicy(actions)

    async def close(self) -> None:
        await self.host.shutdown()
        await self.services.close()

    # -- early phases -------------------------------------------------------------------------
    def begin(self, session: Session) -> ScanContext:
        return ScanContext(self, session, Transaction(session=session))

    async def connect(self, session: Session) -> Verdict | None:
        if not self.host.impls("connect"):
            return None  # no context to build when nobody listens
        return await self.host.call_first("connect", self.begin(session))

    async def helo(self, session: Session, helo: str) -> Verdict | None:
        session.helo = helo
        if not self.host.impls("helo"):
            return None
        return await self.host.call_first("helo", self.begin(session), helo=helo)

    async def mail_from(self, ctx: ScanContext, sender: str, params: dict | None = None):
        ctx.transaction.mail_from = sender
        ctx.transaction.mail_params = dict(params or {})
        return await self.host.call_first("mail_from", ctx, sender=sender,
                                          params=ctx.transaction.mail_params)

    async def rcpt_to(self, ctx: ScanContext, address: str, params: dict | None = None) -> Verdict:
        """Ask plugins about one recipient. Accepted recipients join the transaction (a plugin
        may have rewritten the address or added more)."""
        rcpt = Recipient(address, dict(params or {}))
        verdict = await self.host.call_first("rcpt_to", ctx, recipient=rcpt)
        if verdict is not None and verdict.action.refuses:
            return verdict
        if not any(r.address.lower() == rcpt.address.lower() for r in ctx.recipients):
            ctx.transaction.recipients.append(rcpt)
        if verdict is not None and verdict.action in (Action.DISCARD, Action.QUARANTINE):
            rcpt.verdict = verdict
        return verdict or Verdict.accept(source="pipeline")

    # -- content ------------------------------------------------------------------------------
    async def data(self, ctx: ScanContext, raw: bytes | Message) -> ScanResult:
        t0 = time.monotonic()
        msg = raw if isinstance(raw, Message) else Message(raw)
        ctx.message = msg

        # 1. content scan: every plugin runs, findings accumulate
        for name, result in await self.host.call_all("data", ctx, message=msg):
            self._apply_data_result(ctx, name, result)
        for info in self.host.failed:
            if self.host.on_error(info.name) != "skip":
                ctx.set_verdict(Verdict.tempfail(
                    f"Temporary local problem (filter {info.name} unavailable)", code=451,
                    enhanced="4.3.0", source=info.name))
            ctx.add_symbol("PLUGIN_ERROR", 0.0, [info.name], info.error, source="host")

        # 2. scoring: per recipient total -> action through that recipient's thresholds
        for r in ctx.recipients:
            score = ctx.score_for(r.address)
            action = ctx.action_for(r.address)
            if action is not Action.ACCEPT:
                reason = _score_reason(action, score)
                r.verdict = Verdict(action, reason, source="score").worse(r.verdict)

        # 3. decide: plugins may override outcomes (allow/block lists, per-user policy)
        for name, result in await self.host.call_all("decide", ctx):
            self._apply_decision(ctx, name, result)
        for r in ctx.recipients:
            if r.verdict.action is Action.CONTINUE:
                r.verdict = Verdict.accept(source="pipeline")

        # 4. modify: header, subject and body changes
        mods: list[Modification] = list(ctx.modifications)
        # modify hooks run in plugin order and see the changes earlier plugins returned (a DKIM
        # signer or ARC sealer placed last signs the message as it will leave)
        ctx.pending_modifications = mods
        for impl in self.host.impls("modify"):
            done = self.host.start_one(impl, {"ctx": ctx, "message": msg}, ctx)
            result, failure = done if done.__class__ is tuple else await done
            if isinstance(failure, Verdict):
                ctx.set_verdict(failure)
            elif isinstance(result, Modification):
                mods.append(result)
            elif isinstance(result, (list, tuple)):
                mods.extend(m for m in result if isinstance(m, Modification))

        outcomes = {r.address: RecipientOutcome(r.address, r.verdict.action,
                                                ctx.score_for(r.address), r.verdict)
                    for r in ctx.recipients}
        result = ScanResult(ctx, outcomes, mods, time.monotonic() - t0)
        await self.host.notify("scanned", ctx=ctx, result=result)
        if log.isEnabledFor(logging.INFO):
            log.info("scanned id=%s from=<%s> to=%s score=%.2f action=%s symbols=%s",
                     ctx.transaction.id, ctx.transaction.mail_from,
                     ",".join(f"<{a}>:{o.action.value}" for a, o in outcomes.items()),
                     result.score, result.action.value, ",".join(s.name for s in result.symbols))
        return result

    @staticmethod
    def _apply_data_result(ctx: ScanContext, name: str, result) -> None:
        if isinstance(result, Verdict):
            result.source = result.source or name
            if result.is_final():
                ctx.set_verdict(result)
        elif isinstance(result, dict):
            for addr, v in result.items():
                if isinstance(v, Verdict) and v.is_final():
                    v.source = v.source or name
                    ctx.set_verdict(v, recipient=addr)

    @staticmethod
    def _apply_decision(ctx: ScanContext, name: str, result) -> None:
        if isinstance(result, Verdict):
            result.source = result.source or name
            for r in ctx.recipients:
                r.verdict = result
        elif isinstance(result, dict):
            for addr, v in result.items():
                r = ctx.transaction.recipient(addr)
                if r is not None and isinstance(v, Verdict):
                    v.source = v.source or name
                    r.verdict = v

    # -- events -------------------------------------------------------------------------------
    async def delivered(self, ctx: ScanContext, recipient: str, response: str) -> None:
        await self.host.notify("delivered", ctx=ctx, recipient=recipient, response=response)

    async def bounced(self, ctx: ScanContext, recipient: str, response: str,
                      permanent: bool) -> None:
        await self.host.notify("bounced", ctx=ctx, recipient=recipient, response=response,
                               permanent=permanent)

    async def quarantined(self, ctx: ScanContext, recipient: str, reason: str) -> None:
        await self.host.notify("quarantined", ctx=ctx, recipient=recipient, reason=reason)

    # -- all phases at once (filterd check, tests) --------------------------------------------
    async def scan(self, raw: bytes, sender: str = "", recipients: Iterable[str] = (),
                   session: Session | None = None) -> ScanResult:
        """Run a whole transaction offline. Early-phase rejections are kept as the outcome of
        the recipients they concern (or of all, for connect/helo/mail)."""
        session = session or Session()
        early = await self.connect(session)
        if early is None and session.helo:
            early = await self.helo(session, session.helo)
        ctx = self.begin(session)
        if early is None:
            early = await self.mail_from(ctx, sender, {})
        rejected: dict[str, Verdict] = {}
        for addr in list(recipients) or ["postmaster@localhost"]:
            if early is not None and early.action.refuses:
                rejected[addr] = early
                continue
            v = await self.rcpt_to(ctx, addr, {})
            if v.action.refuses:
                rejected[addr] = v
        result = await self.data(ctx, raw) if ctx.recipients else ScanResult(
            ctx, {}, [], 0.0)
        if ctx.message is None:
            ctx.message = Message(raw)
        for addr, v in rejected.items():
            result.outcomes[addr] = RecipientOutcome(addr, v.action, 0.0, v)
        return result


def _score_reason(action: Action, score: float) -> str:
    if action is Action.REJECT:
        return f"Message rejected as spam (score {score:.1f})"
    if action is Action.TEMPFAIL:
        return f"Message deferred, try again later (score {score:.1f})"
    return f"spam score {score:.1f}"


def load_config_and_plugins(config_path: str | None = None, overrides: Iterable[str] = (),
                            use_default_path: bool = True):
    """Read the config, discover plugins (their CONFIG sections extend the schema), check."""
    raw = config_mod.load_raw(config_path, overrides, use_default_path)
    plugins_section = dict(config_mod.core_schema().defaults.get("plugins", {}))
    user_plugins = raw.data.get("plugins")
    if isinstance(user_plugins, dict):
        plugins_section.update(user_plugins)
    infos = discover(plugins_section)
    config = config_mod.load(config_path, overrides,
                             plugin_texts=[(i.name, i.config_text) for i in infos if not i.error],
                             use_default_path=use_default_path)
    return config, infos
