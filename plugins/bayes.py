"""Bayes: filterd's own Bayesian classifier (filterd/bayes) → BAYES_* symbols; autolearn from
confident verdicts; training by e-mail through configured learn addresses."""
from __future__ import annotations

import ipaddress
import logging
import time

from filterd.bayes import Bayes, learn_message
from filterd.bayes.classifier import band
from filterd.hookspecs import hookimpl
from filterd.model import Message
from filterd.store import StoreError
from filterd.verdict import Verdict

log = logging.getLogger("filterd.bayes")

CONFIG = """
# Token database namespace in the shared store ([store]: SQLite file or Redis).
namespace = "bayes:"
# Until this many spam AND ham messages are learned the classifier stays silent
# (symbol BAYES_NOT_TRAINED, weight 0).
min_spam = 100
min_ham = 100
# Probability bands: below ham_cutoff -> BAYES_HAM, from spam_cutoff -> BAYES_SPAM,
# between -> BAYES_UNSURE. Below 0.01 / from 0.99 the _HIGH variants fire instead.
# Weights are in rules/50-bayes-scores.toml (override them in [scores]).
ham_cutoff = 0.2
spam_cutoff = 0.9
# Classifier tuning (Robinson f(w) + Fisher chi-square): prior strength, prior probability,
# minimum distance from 0.5 for a token to count, the most tokens used per message, and the
# most tokens' worth of evidence Fisher's test counts (longer messages are scaled down to it;
# 0 = no limit).
robs = 0.0178
robx = 0.52
min_dev = 0.2
max_tokens = 10000
n_eff = 50
# The linear model beside Fisher's method (filterd/bayes/linear.py): a weight per token
# bucket, learned from the classifier's mistakes by every learn, mixed into the probability
# once trained on at least half as many messages as the counts hold (a database trained before
# it existed: run filterd bayes train again). false: Fisher's score alone.
linear = true
# Token probabilities are kept in memory between messages. They are worked out again once the
# learned spam or ham count has moved by more than cache_drift (a fraction: 0.01 = 1 %) or
# after cache_age seconds, so learning on this or another node (autolearn learns most clean
# mail) does not make every message look all its tokens up again. cache_drift = 0: any change
# to the database empties the cache.
cache_drift = 0.01
cache_age = 300
# Autolearn after delivery/quarantine (never for mail rejected or deferred at SMTP time).
# Spam: total score WITHOUT the Bayes symbols at least autolearn_spam_score.
# Ham: score without Bayes at most autolearn_ham_score AND a Bayes probability at most
# autolearn_ham_probability (so an untrained or unsure classifier never teaches itself ham).
autolearn = true
autolearn_spam_score = 10.0
autolearn_ham_score = 0.0
autolearn_ham_probability = 0.02
# Training by e-mail: users forward misclassified mail (as an attachment, or redirect/bounce
# it) to these addresses; filterd learns the original and does not deliver the message.
# Full addresses, e.g. ["spam@gateway.example.com"].
learn_spam_addresses = []
learn_ham_addresses = []
# Besides authenticated (SMTP AUTH) users, clients from these networks may use the learn
# addresses (e.g. ["192.0.2.0/24"]). Everyone else gets 550 5.7.1.
learn_networks = []
# At most this many attached messages are learned from one learn message.
learn_max_messages = 50
# The token store may be slow or down: skip Bayes (symbol PLUGIN_ERROR) rather than tempfail.
on_error = "skip"
"""

# A read of the token store's message counts (is Bayes trained? which counts does f(w) use?) is
# reused for this many seconds: one store round trip less per message. Learning through this
# plugin (by e-mail, autolearn) reads them afresh; `filterd bayes train` elsewhere shows within it.
STATE_TTL = 1.0

# Suggested weights; rules/50-bayes-scores.toml and [scores] override them.
WEIGHTS = {"BAYES_SPAM_HIGH": 5.0, "BAYES_SPAM": 3.0, "BAYES_UNSURE": 0.0, "BAYES_HAM": -1.0,
           "BAYES_HAM_HIGH": -2.0}


def extract_originals(message: Message, limit: int = 50) -> list[bytes]:
    """The messages a learn message carries: every attached ``message/rfc822`` part (a forward
    as attachment), or, when there is none, the message itself (a redirect/bounce, which keeps
    the original headers and adds Resent-*; those are dropped)."""
    found: list[bytes] = []
    root = message.parsed.email
    stack = [root]
    while stack and len(found) < limit:
        node = stack.pop()
        if node.get_content_type() == "message/rfc822" and node is not root:
            payload = node.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if inner is not None:
                try:
                    found.append(inner.as_bytes())
                except Exception:  # noqa: BLE001 - a broken inner message is skipped
                    continue
            continue
        if node.is_multipart():
            payload = node.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed(payload))
    if found:
        return found
    head, body = message.header_block_and_body()
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    kept, skip = [], False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not skip:
                kept.append(line)
            continue
        skip = line.lower().startswith(b"resent-")
        if not skip:
            kept.append(line)
    return [b"\n".join(kept) + body]


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.bayes: Bayes | None = None
        self.learn: dict[str, str] = {}
        self.networks = []
        self._state: tuple[int, int, int] | None = None
        self._state_at = 0.0

    async def state(self) -> tuple[int, int, int]:
        """The token store's (nspam, nham, generation), read at most every STATE_TTL seconds."""
        now = time.monotonic()
        if self._state is None or now - self._state_at > STATE_TTL:
            self._state = await self.bayes.tokens.state()
            self._state_at = now
        return self._state

    @hookimpl
    def startup(self, options, services):
        self.bayes = Bayes.from_options(services.store, options)
        self.learn = {a.lower(): "spam" for a in options.get("learn_spam_addresses", [])}
        self.learn.update({a.lower(): "ham" for a in options.get("learn_ham_addresses", [])})
        nets = []
        for n in options.get("learn_networks", []):
            try:
                nets.append(ipaddress.ip_network(n, strict=False))
            except ValueError as exc:
                raise ValueError(f"[bayes] learn_networks: {n!r} is not a network: {exc}") from exc
        self.networks = nets

    # -- training by e-mail ---------------------------------------------------------------------
    def _may_learn(self, session) -> bool:
        if session.auth_user:
            return True
        ip = session.ip
        return ip is not None and any(ip in n for n in self.networks)

    @hookimpl
    def rcpt_to(self, ctx, recipient):
        kind = self.learn.get(recipient.address.lower())
        if kind is None:
            return None
        return self._learn_address(ctx, recipient, kind)

    def idle_hooks(self) -> set[str]:
        # RCPT TO and the verdict on learn messages only matter with learn addresses
        return set() if self.learn else {"rcpt_to", "decide"}

    def wants(self, hook, session=None, address=None) -> bool:
        # RCPT TO matters only for the learn addresses (refused to non-local senders there)
        if hook != "rcpt_to":
            return True
        return bool(self.learn) if address is None else address.lower() in self.learn

    def _learn_address(self, ctx, recipient, kind):
        if not self._may_learn(ctx.session):
            return Verdict.reject(
                f"{recipient.address} accepts mail from authenticated local users only",
                code=550, enhanced="5.7.1")
        recipient.data["bayes_learn"] = kind
        return Verdict.accept(f"learn address ({kind})")

    async def _learn_from(self, ctx, message: Message, options) -> None:
        kinds = {r.data.get("bayes_learn") for r in ctx.recipients} - {None}
        originals = extract_originals(message, int(options.get("learn_max_messages", 50)))
        results = []
        for kind in sorted(kinds):
            for raw in originals:
                results.append(await learn_message(self.services.store, raw, kind == "spam",
                                                   options, bayes=self.bayes))
                self._state = None
        ctx.data["bayes_learned"] = {"kinds": sorted(kinds), "results": results}
        log.info("bayes: learn message id=%s from user=%r ip=%s: %d message(s) as %s: %s",
                 ctx.transaction.id, ctx.session.auth_user, ctx.session.peer_ip, len(originals),
                 "+".join(sorted(kinds)), ",".join(results))

    # -- scanning -------------------------------------------------------------------------------
    @hookimpl
    async def data(self, ctx, message, options):
        learners = [r for r in ctx.recipients if r.data.get("bayes_learn")]
        if learners:
            await self._learn_from(ctx, message, options)
            if len(learners) == len(ctx.recipients):
                return None  # nothing else to scan for: the message is consumed
        state = await self.state()
        nspam, nham = state[0], state[1]
        if nspam < int(options["min_spam"]) or nham < int(options["min_ham"]):
            ctx.add_symbol("BAYES_NOT_TRAINED", 0.0, [f"spam={nspam}", f"ham={nham}"],
                           "Bayes has not learned enough messages yet", source="bayes")
            ctx.data["bayes"] = {"trained": False, "nspam": nspam, "nham": nham}
            return None
        res = await self.bayes.classify(message, state=state)
        name = band(res.probability, float(options["ham_cutoff"]), float(options["spam_cutoff"]))
        sym = ctx.add_symbol(name, WEIGHTS[name], [f"{res.probability:.4f}"],
                             f"Bayes spam probability {res.probability:.4f}", source="bayes")
        ctx.data["bayes"] = {"trained": True, "probability": res.probability, "symbol": name,
                             "score": sym.score}
        return None

    @hookimpl
    def decide(self, ctx):
        """Messages to the learn addresses are consumed (learned), never delivered; when
        learning failed (token store down) they are deferred so the sender's server retries."""
        learned = ctx.data.get("bayes_learned")
        out = {}
        for r in ctx.recipients:
            kind = r.data.get("bayes_learn")
            if not kind:
                continue
            if learned is None:
                out[r.address] = Verdict.tempfail(
                    "Learning is temporarily unavailable; please try again later",
                    code=451, enhanced="4.3.0", source="bayes")
            else:
                out[r.address] = Verdict.discard(
                    f"learned as {kind} ({','.join(learned['results'])})", source="bayes")
        return out or None

    # -- autolearn ------------------------------------------------------------------------------
    async def _autolearn(self, ctx, recipient: str, options) -> None:
        if not options.get("autolearn") or ctx.message is None:
            return
        if ctx.data.get("bayes_autolearned") is not None or ctx.data.get("bayes_learned"):
            return
        info = ctx.data.get("bayes")
        if not info:
            return
        r = ctx.transaction.recipient(recipient)
        if r is not None and (r.data.get("bayes_learn")
                              or r.verdict.action.refuses):
            return
        score = ctx.score_for(recipient) - float(info.get("score", 0.0))
        p = info.get("probability")
        spam = None
        if score >= float(options["autolearn_spam_score"]):
            spam = True
        elif (score <= float(options["autolearn_ham_score"]) and p is not None
              and p <= float(options["autolearn_ham_probability"])):
            spam = False
        if spam is None:
            ctx.data["bayes_autolearned"] = ""
            return
        try:
            outcome = await learn_message(self.services.store, ctx.message, spam, options,
                                          bayes=self.bayes)
            self._state = None
        except StoreError as exc:
            log.warning("bayes: autolearn of id=%s failed: %s", ctx.transaction.id, exc)
            return
        ctx.data["bayes_autolearned"] = f"{'spam' if spam else 'ham'}:{outcome}"

    @hookimpl
    async def delivered(self, ctx, recipient):
        await self._autolearn(ctx, recipient, self.options)

    @hookimpl
    async def quarantined(self, ctx, recipient):
        await self._autolearn(ctx, recipient, self.options)
