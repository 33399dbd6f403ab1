"""Mailing lists administered by email: posts to members (VERP, RFC 2369 List-* headers,
RFC 8058 one-click unsubscribe), double opt-in subscribe/unsubscribe, help, moderation of
non-member posts by reply, bounce processing, DMARC From rewriting. Lists are created with
``filterd list``; see filterd/lists.py for the addresses each list answers."""
from __future__ import annotations

import email.utils
import logging
import re
import time
from urllib.parse import quote

from filterd import mailer
from filterd.config import parse_duration
from filterd.hookspecs import hookimpl
from filterd.lists import ListAddress, ListInfo, ListManager, verp_decode, verp_encode
from filterd.model import Message
from filterd.rewrite import apply_modifications
from filterd.store import StoreError
from filterd.verdict import Action, Modification, Verdict

log = logging.getLogger("filterd.lists")

CONFIG = """
# Text put before the subject of list copies; {list} is the list's local part. "" = none.
subject_prefix = ""
# Hard bounces (within bounce_window) after which a member stops receiving copies.
bounce_threshold = 3
bounce_window = "30d"
# How long confirmation and moderation links stay valid.
token_ttl = "7d"
# Base URL of filterd's web pages, for RFC 8058 one-click unsubscribe links
# (e.g. "https://mx.example.org:8025"); "" = mailto unsubscribe only.
web_base_url = ""
# Rewrite From to the list address when the author's domain publishes DMARC
# p=reject or p=quarantine, so list copies still pass DMARC at the members' providers.
dmarc_mitigation = true
"""

HELP = """This is the {address} mailing list{desc}.

Commands, sent as the subject or the first line of a message to {request}:
  help          this text
  subscribe     subscribe your address (you will be asked to confirm)
  unsubscribe   unsubscribe your address (you will be asked to confirm)

Shortcuts: mail {subscribe} to subscribe, {unsubscribe} to unsubscribe.
Post to the list by writing to {address}.
"""


def _command_word(message: Message, known: tuple[str, ...]) -> str:
    """The first known command word in the subject (minus Re:/Fwd:), else in the first
    unquoted body line; "" when there is none."""
    subject = re.sub(r"^((re|fwd?|aw|sv):\s*)+", "", message.parsed.subject.strip().lower())
    candidates = [subject] + [ln.strip().lower() for ln in message.parsed.text.splitlines()
                              if ln.strip() and not ln.strip().startswith(">")][:1]
    for text in candidates:
        word = text.split()[0].strip(".,:;!") if text.split() else ""
        if word in known:
            return word
    return ""


def _sender_of(ctx) -> str:
    s = ctx.transaction.mail_from
    if s:
        return s.lower()
    return (ctx.message.parsed.from_address or "").lower() if ctx.message else ""


def _is_hard_bounce(message: Message) -> bool:
    for part in message.parsed.parts:
        if part.content_type in ("message/delivery-status", "text/plain"):
            if re.search(r"(?im)^status:\s*5\.\d+\.\d+", part.text()):
                return True
    return bool(re.search(r"(?im)^status:\s*5\.\d+\.\d+", message.parsed.text))


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self._manager: ListManager | None = None
        self.list_domains: set[str] = set()
        self.domains_at = float("-inf")

    @property
    def manager(self) -> ListManager:
        if self._manager is None:  # the store opens on first use, not at start-up
            o = self.options
            self._manager = ListManager(self.services.store, int(o["bounce_threshold"]),
                                        parse_duration(o["bounce_window"]),
                                        parse_duration(o["token_ttl"]))
        return self._manager

    def wants(self, hook, session=None, address=None) -> bool:
        # RCPT TO only looks the list up (and tempfails while the store is down): run at end of
        # message instead, that tempfail covers the whole message, which is just as safe
        return hook != "rcpt_to"

    # -- pipeline hooks -----------------------------------------------------------------------
    @hookimpl
    async def rcpt_to(self, ctx, recipient):
        try:
            la = await self.manager.resolve(recipient.address)
            if time.monotonic() - self.domains_at > 60:  # remembered for store outages
                self.list_domains = {a.rpartition("@")[2] for a in await self.manager.all()}
                self.domains_at = time.monotonic()
        except StoreError as exc:
            # the store is down: mail for a domain known to host lists waits (451) rather than
            # being treated as a plain address; other mail flows
            if recipient.domain in self.list_domains:
                log.error("lists: store unavailable, deferring <%s>: %s", recipient.address, exc)
                return Verdict.tempfail("Mailing list service temporarily unavailable",
                                        code=451, enhanced="4.3.0")
            return None
        if la is not None:
            ctx.data.setdefault("mailing_lists", {})[recipient.address.lower()] = la
        return None

    @hookimpl
    def decide(self, ctx):
        """List addresses consume the message: copies go out separately after the scan. Mail
        that policy rejects or quarantines is not distributed (it keeps that outcome)."""
        found = ctx.data.get("mailing_lists") or {}
        out = {}
        for r in ctx.recipients:
            la = found.get(r.address.lower())
            if la is not None and r.verdict.action.delivers:
                out[r.address] = Verdict.discard(f"handled by list {la.info.address} "
                                                 f"({la.command})", source="mailing_lists")
        return out or None

    @hookimpl
    async def scanned(self, ctx, result):
        if ctx.session.front_door == "check":
            return  # an offline scan shows the outcome but never mails anybody
        found = ctx.data.get("mailing_lists") or {}
        for addr, la in found.items():
            outcome = next((o for a, o in result.outcomes.items() if a.lower() == addr), None)
            if outcome is None or outcome.action is not Action.DISCARD or \
                    outcome.verdict.source != "mailing_lists":
                continue
            try:
                await self.handle(ctx, la, ctx.message)
            except Exception:  # noqa: BLE001 - one list failing must not affect the message
                log.exception("list %s: handling %s from <%s> failed", la.info.address,
                              la.command, ctx.transaction.mail_from)

    # -- commands -----------------------------------------------------------------------------
    async def handle(self, ctx, la: ListAddress, message: Message) -> None:
        info, sender = la.info, _sender_of(ctx)
        if la.command == "bounces":
            member = verp_decode(la.detail)
            if _is_hard_bounce(message) and await self.manager.record_bounce(info.address, member):
                log.warning("list %s: member %s disabled after %d hard bounces", info.address,
                            member, self.manager.bounce_threshold)
            return
        if not sender or sender.startswith(("mailer-daemon@", "postmaster@")) or \
                message.header("Auto-Submitted").lower().startswith("auto-"):
            return  # never answer automatic mail: no loops, no backscatter
        if la.command == "post":
            await self.post(ctx, info, sender, message)
        elif la.command in ("subscribe", "unsubscribe"):
            await self.ask_confirmation(info, la.command, sender)
        elif la.command == "request":
            word = _command_word(message, ("help", "subscribe", "unsubscribe"))
            if word in ("subscribe", "unsubscribe"):
                await self.ask_confirmation(info, word, sender)
            else:
                await self.reply(info, sender, f"Help for {info.address}", self.help_text(info))
        elif la.command == "confirm":
            await self.confirm(info, la.detail, sender, message)
        elif la.command == "moderate":
            await self.moderate(info, la.detail, sender, message)
        elif la.command == "owner":
            if info.owners:
                await mailer.submit(self.services, info.cmd("bounces", "owner"), info.owners,
                                    message.raw)

    def help_text(self, info: ListInfo) -> str:
        return HELP.format(address=info.address,
                           desc=f" ({info.description})" if info.description else "",
                           request=info.cmd("request"), subscribe=info.cmd("subscribe"),
                           unsubscribe=info.cmd("unsubscribe"))

    async def ask_confirmation(self, info: ListInfo, action: str, who: str) -> None:
        token = await self.manager.new_pending(info.address, action, who)
        confirm = info.cmd("confirm", token)
        body = (f"Someone (hopefully you) asked to {action} {who} "
                f"{'to' if action == 'subscribe' else 'from'} the list {info.address}.\n\n"
                f"To confirm, reply to this message, or send any message to\n  {confirm}\n\n"
                f"If you did not ask for this, ignore this message.\n")
        await self.reply(info, who, f"Confirm {action} to {info.address} [{token}]", body,
                         reply_to=confirm)

    async def confirm(self, info: ListInfo, token: str, sender: str, message: Message) -> None:
        pending = await self.manager.take_pending(info.address, token)
        from_hdr = (message.parsed.from_address or "").lower()
        if pending is None or pending["address"] not in (sender, from_hdr):
            await self.reply(info, sender, f"Confirmation for {info.address} failed",
                             "This confirmation is unknown, expired, already used, or was sent "
                             "from another address than the one to (un)subscribe.\n")
            return
        who = pending["address"]
        if pending["action"] == "subscribe":
            await self.manager.add_members(info.address, who)
            log.info("list %s: %s subscribed", info.address, who)
            await self.reply(info, who, f"Welcome to {info.address}", self.help_text(info))
        else:
            await self.manager.remove_members(info.address, who)
            log.info("list %s: %s unsubscribed", info.address, who)
            await self.reply(info, who, f"You left {info.address}",
                             f"{who} no longer receives mail from {info.address}.\n")

    async def post(self, ctx, info: ListInfo, sender: str, message: Message) -> None:
        from_hdr = (message.parsed.from_address or "").lower()
        member = await self.manager.is_member(info.address, sender) or \
            (from_hdr and await self.manager.is_member(info.address, from_hdr))
        if not member and info.moderated:
            token = await self.manager.hold(info.address, sender, message.raw)
            if info.owners:
                body = (f"A message from {sender} to {info.address} waits for approval.\n"
                        f"Subject: {message.parsed.subject}\n\n"
                        f"Reply with \"approve\" or \"reject\" as the first word, or write to\n"
                        f"  {info.cmd('moderate', token)}\n")
                for owner in info.owners:
                    await self.reply(info, owner, f"Moderate post to {info.address} [{token}]",
                                     body, reply_to=info.cmd("moderate", token))
            log.info("list %s: post from non-member %s held (%s)", info.address, sender, token)
            return
        await self.distribute(info, message.raw)

    async def moderate(self, info: ListInfo, token: str, sender: str, message: Message) -> None:
        if sender not in info.owners:
            log.warning("list %s: moderation reply from non-owner %s ignored", info.address, sender)
            return
        held = await self.manager.take_held(info.address, token)
        if held is None:
            await self.reply(info, sender, f"Moderation for {info.address} failed",
                             "That post is unknown, expired or already handled.\n")
            return
        author, raw = held
        if _command_word(message, ("approve", "reject")) == "approve":
            await self.distribute(info, raw)
            log.info("list %s: post from %s approved by %s", info.address, author, sender)
        else:
            log.info("list %s: post from %s rejected by %s", info.address, author, sender)
            await self.reply(info, author, f"Your post to {info.address} was not accepted",
                             "A moderator of the list did not approve your message.\n")

    # -- outgoing mail ------------------------------------------------------------------------
    async def distribute(self, info: ListInfo, raw: bytes) -> int:
        members = await self.manager.active_members(info.address)
        base = await self.list_copy(info, raw)
        for m in members:
            mods = [Modification.add_header("List-Unsubscribe", self.unsubscribe_value(info, m))]
            if self.options.get("web_base_url"):
                mods.append(Modification.add_header("List-Unsubscribe-Post",
                                                    "List-Unsubscribe=One-Click"))
            await mailer.submit(self.services, info.cmd("bounces", verp_encode(m)), [m],
                                apply_modifications(base, mods))
        log.info("list %s: distributed to %d members", info.address, len(members))
        return len(members)

    def unsubscribe_value(self, info: ListInfo, member: str) -> str:
        links = []
        web = self.options.get("web_base_url") or ""
        if web:
            token = ListManager.unsubscribe_token(info, member)
            links.append(f"<{web.rstrip('/')}/lists/unsubscribe?list={quote(info.address)}"
                         f"&member={quote(member)}&token={token}>")
        links.append(f"<mailto:{info.cmd('unsubscribe')}>")
        return ", ".join(links)

    async def list_copy(self, info: ListInfo, raw: bytes) -> bytes:
        msg = Message(raw)
        mods = [Modification.remove_header(h) for h in
                ("List-Id", "List-Post", "List-Help", "List-Subscribe", "List-Unsubscribe",
                 "List-Unsubscribe-Post", "Precedence", "Return-Path")]
        desc = f"{info.description} " if info.description else ""
        mods += [Modification.add_header("List-Id", f"{desc}<{info.list_id}>"),
                 Modification.add_header("List-Post", f"<mailto:{info.address}>"),
                 Modification.add_header("List-Help",
                                         f"<mailto:{info.cmd('request')}?subject=help>"),
                 Modification.add_header("List-Subscribe", f"<mailto:{info.cmd('subscribe')}>"),
                 Modification.add_header("Precedence", "list")]
        prefix = (self.options.get("subject_prefix") or "").replace("{list}", info.local)
        if prefix and prefix.strip() not in msg.parsed.subject:
            mods.append(Modification.rewrite_subject(prefix + "{subject}"))
        if self.options.get("dmarc_mitigation", True) and await self.strict_dmarc(msg):
            name, addr = (msg.parsed.from_addresses or [("", "")])[0]
            mods += [Modification.change_header(
                "From", email.utils.formataddr((f"{name or addr} via {info.local}", info.address)))]
            if not msg.parsed.header("Reply-To"):
                mods.append(Modification.add_header("Reply-To",
                                                    email.utils.formataddr((name, addr))))
        return apply_modifications(raw, mods)

    async def strict_dmarc(self, msg: Message) -> bool:
        """Does the author's domain (or its organizational domain) publish p=reject/quarantine?"""
        domain = msg.parsed.from_domain
        if not domain:
            return False
        labels = domain.split(".")
        candidates = [domain] + ([".".join(labels[-2:])] if len(labels) > 2 else [])
        for d in candidates:
            try:
                records = await self.services.dns.txt(f"_dmarc.{d}")
            except Exception:  # noqa: BLE001 - DNS trouble: assume strict, rewriting is safe
                return True
            for r in records:
                if r.lower().startswith("v=dmarc1"):
                    m = re.search(r"(?i)\bp\s*=\s*(\w+)", r)
                    return bool(m) and m.group(1).lower() in ("reject", "quarantine")
        return False

    async def reply(self, info: ListInfo, to: str, subject: str, body: str,
                    reply_to: str = "") -> None:
        headers = [f"From: {info.cmd('request')}", f"To: {to}", f"Subject: {subject}",
                   f"Date: {mailer.format_date()}",
                   f"Message-ID: {mailer.make_message_id(self.services)}",
                   "Auto-Submitted: auto-replied", f"List-Id: <{info.list_id}>",
                   "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                   "Content-Transfer-Encoding: 8bit"]
        if reply_to:
            headers.append(f"Reply-To: {reply_to}")
        raw = ("\r\n".join(headers) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()
        await mailer.submit(self.services, info.cmd("bounces", "admin"), [to], raw)
