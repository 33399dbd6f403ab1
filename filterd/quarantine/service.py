"""The quarantine service: hold, release, delete, allow/block — shared by the gateway (which
calls :meth:`QuarantineService.hold`), the web pages, the mail command plugin and the CLI.

Registered by the built-in plugin ``plugins/quarantine.py`` as ``services.extra["quarantine"]``.
"""
from __future__ import annotations

import email.utils
import inspect
import logging
import os
import secrets
import time
from email.message import EmailMessage
from pathlib import Path

from ..config import parse_duration
from .store import Entry, QuarantineStore
from .tokens import Signer, TokenError

log = logging.getLogger("filterd.quarantine")


class ActionError(Exception):
    """An action that cannot be done (bad token, already used, wrong sender...); the message is
    shown to the user as is."""


def load_secret(cfg, directory: Path) -> bytes:
    configured = cfg.get("quarantine.secret") or ""
    if configured:
        return configured.encode()
    path = directory / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    tmp = directory / f".secret.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


def _addr(value: str) -> str:
    return email.utils.parseaddr(value or "")[1].strip().lower()


class QuarantineService:
    def __init__(self, config, services):
        self.config = config
        self.services = services
        q = config.section("quarantine")
        self.options = q
        self.directory = config.path("quarantine.directory", "quarantine")
        self._qstore: QuarantineStore | None = None
        self._signer: Signer | None = None
        self.token_lifetime = parse_duration(q["token_lifetime"])
        self.login_lifetime = parse_duration(q["login_lifetime"])
        self.base_url = q["base_url"].rstrip("/")

    # Opened on first use: `filterd check` loads this plugin too and must not need a writable
    # state directory or a database.
    @property
    def qstore(self) -> QuarantineStore:
        if self._qstore is None:
            q = self.options
            self._qstore = QuarantineStore(self.services.store, self.directory,
                                           parse_duration(q["retention"]), q["share_messages"])
        return self._qstore

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            try:
                self._signer = Signer(load_secret(self.config, self.directory))
            except OSError as exc:
                raise ActionError(f"cannot read or create the quarantine secret in "
                                  f"{self.directory} ([quarantine] secret / directory): "
                                  f"{exc.strerror or exc}") from exc
        return self._signer

    # -- holding ------------------------------------------------------------------------------
    async def hold(self, ctx, result, recipients: list[str], *, events: bool = False) -> None:
        """Keep the message for ``recipients`` (one entry each, one file). Returns only once the
        message is on disk and indexed; raises if it cannot be stored (the caller tempfails).

        The ``quarantined`` event is fired by the front door after this returns (the gateway's
        and the milter's do); ``events=True`` fires it here instead, once per recipient."""
        if not recipients:
            return
        if result is not None and self.options.get("keep") == "modified":
            data = result.message_bytes()
        else:
            data = ctx.message.raw
        msg = ctx.message.parsed if ctx.message is not None else None
        symbols = [[s.name, s.score] for s in (result.symbols if result is not None else [])]
        entries = []
        for addr in recipients:
            outcome = result.outcomes.get(addr) if result is not None else None
            score = outcome.score if outcome else ctx.score_for(addr)
            reason = (outcome.verdict.reason if outcome else "") or f"spam score {score:.1f}"
            rsyms = [[s.name, s.score] for s in ctx.rcpt_symbols.get(addr.lower(), ())]
            entries.append(Entry(
                id="", message_id="", recipient=addr.lower(),
                sender=ctx.transaction.mail_from or "",
                from_header=msg.header("From") if msg else "",
                subject=msg.subject if msg else "",
                date=msg.header("Date") if msg else "",
                received_at=time.time(), score=score, symbols=symbols + rsyms, reason=reason,
                queue_id=ctx.transaction.id or ""))
        await self.qstore.add_message(data, entries)
        pipeline = self.services.extra.get("pipeline")
        for e in entries:
            log.info("quarantined entry=%s message=%s id=%s from=<%s> to=<%s> score=%.2f: %s",
                     e.id, e.message_id, e.queue_id, e.sender, e.recipient, e.score, e.reason)
            if events and pipeline is not None:
                await pipeline.quarantined(ctx, e.recipient, e.reason)

    async def hold_quarantined(self, result) -> list[str]:
        """Hold every recipient whose outcome is quarantine and fire the events (for callers
        that are not a front door: tools, tests)."""
        from ..verdict import Action

        rcpts = result.recipients_with(Action.QUARANTINE)
        await self.hold(result.ctx, result, rcpts, events=True)
        return rcpts

    # -- tokens and links ---------------------------------------------------------------------
    def token(self, action: str, entry: Entry) -> str:
        return self.signer.make(action, entry.id, entry.recipient, self.token_lifetime)

    def login_token(self, recipient: str) -> str:
        return self.signer.make("login", "", recipient, self.login_lifetime)

    def action_url(self, action: str, entry: Entry) -> str:
        return f"{self.base_url}/q/a/{self.token(action, entry)}"

    def login_url(self, recipient: str) -> str:
        from urllib.parse import quote

        return (f"{self.base_url}/q/login?u={quote(recipient.lower())}"
                f"&t={self.login_token(recipient)}")

    def mailto(self, action: str, entry: Entry) -> str:
        cmd = self.options.get("command_address") or ""
        if not cmd or "@" not in cmd:
            return ""
        local, domain = cmd.rsplit("@", 1)
        return f"{local}{self.options['recipient_delimiter']}{self.token(action, entry)}@{domain}"

    async def entry_for_token(self, token: str) -> tuple[Entry, str]:
        """Verify an action token: (entry, action). Raises ActionError with the reason."""
        try:
            t = self.signer.parse(token)
        except TokenError as exc:
            raise ActionError(str(exc)) from None
        if t.action == "login" or not t.entry_id:
            raise ActionError("this is not an action link")
        entry = await self.qstore.get(t.entry_id)
        if entry is None:
            raise ActionError("this message is no longer in quarantine (released, deleted or "
                              "expired)")
        try:
            self.signer.verify(token, entry.recipient)
        except TokenError as exc:
            raise ActionError(str(exc)) from None
        return entry, t.action

    def verify_login(self, recipient: str, token: str) -> None:
        try:
            t = self.signer.verify(token, recipient)
        except TokenError as exc:
            raise ActionError(str(exc)) from None
        if t.action != "login":
            raise ActionError("this is not a login link")

    # -- actions ------------------------------------------------------------------------------
    async def perform(self, entry: Entry, action: str, by: str = "") -> str:
        """Do ``action`` on ``entry``; returns a sentence for the user. Release and delete are
        single-use (a second try is refused); allow/block act once per entry too."""
        if entry.status != "held" and action in ("release", "delete"):
            raise ActionError(f"this message was already {entry.status}")
        if not await self.qstore.mark_used(action, entry.id, self.token_lifetime + 86400):
            raise ActionError("this link was already used")
        try:
            return await self._perform(entry, action, by)
        except Exception:
            # nothing happened (relay down...): let the user try the same link again
            await self.qstore.store.delete(f"quarantine:used:{action}:{entry.id}")
            raise

    async def _perform(self, entry: Entry, action: str, by: str) -> str:
        who = f" by {by}" if by else ""
        if action == "release":
            await self.release(entry)
            log.info("quarantine release entry=%s to=<%s>%s", entry.id, entry.recipient, who)
            return (f"The message “{entry.subject}” was released and is on its way to "
                    f"{entry.recipient}.")
        if action == "delete":
            await self.delete(entry)
            log.info("quarantine delete entry=%s to=<%s>%s", entry.id, entry.recipient, who)
            return f"The message “{entry.subject}” was deleted."
        sender = _addr(entry.sender) or _addr(entry.from_header)
        if not sender:
            raise ActionError("this message has no sender address to list")
        await self.qstore.list_add(action, entry.recipient, sender)
        log.info("quarantine %s sender=<%s> for=<%s>%s", action, sender, entry.recipient, who)
        if action == "allow":
            if entry.status == "held":
                await self.release(entry)
            return (f"Mail from {sender} will always be delivered to {entry.recipient}; "
                    f"this message was released.")
        if entry.status == "held":
            await self.delete(entry)
        return (f"Mail from {sender} to {entry.recipient} will always be refused; "
                f"this message was deleted.")

    async def release(self, entry: Entry) -> None:
        data = await self.qstore.read_message(entry)
        await self.deliver(entry.sender, [entry.recipient], data, meta={
            "quarantine_release": entry.id})
        entry.status = "released"
        await self.qstore.save(entry)
        await self.qstore.remove(entry)
        if self.options.get("learn_ham_on_release"):
            await self._learn_ham(data)

    async def delete(self, entry: Entry) -> None:
        entry.status = "deleted"
        await self.qstore.save(entry)
        await self.qstore.remove(entry)

    async def _learn_ham(self, data: bytes) -> None:
        """Offer released mail to the Bayesian filter as ham: a ``services.extra["learn"]``
        callable ``(data, "ham")`` if registered, else ``filterd.bayes.learn_message`` when the
        bayes plugin is installed and enabled."""
        try:
            learn = self.services.extra.get("learn")
            if learn is not None:
                r = learn(data, "ham")
            else:
                bayes = self.config.section("bayes")
                if not isinstance(bayes, dict) or not bayes or not bayes.get("enabled", True):
                    return
                try:
                    from ..bayes import learn_message
                except ImportError:
                    return
                r = learn_message(self.services, data, spam=False)
            if inspect.isawaitable(r):
                await r
        except Exception:  # learning is best effort; the release already happened
            log.exception("learning a released message as ham failed")

    # -- sending ------------------------------------------------------------------------------
    async def deliver(self, mail_from: str, recipients: list[str], data: bytes,
                      meta: dict | None = None) -> None:
        """Hand a message to delivery without scanning it again, first of: a ``deliver``
        callable, the ``submit`` seam of :mod:`filterd.mailer` (``filterd serve`` queues it), the
        gateway's spool + delivery core in this process, this node's gateway spool (CLI, web
        process), else SMTP to ``[quarantine] relay``."""
        extra = self.services.extra
        if self.options.get("release_via") == "auto":
            fn = extra.get("deliver")
            if callable(fn):
                r = fn(mail_from, list(recipients), data)
                if inspect.isawaitable(r):
                    await r
                return
            submit = extra.get("submit")  # filterd.mailer's seam: `filterd serve` queues
            if submit is not None:
                await submit(mail_from, list(recipients), data, dict(meta or {}))
                return
            spool, core = extra.get("spool"), extra.get("delivery")
            if spool is not None and core is not None and hasattr(spool, "enqueue"):
                from ..queue.spool import Envelope  # the gateway's; present when spool exists

                qid = await spool.enqueue(Envelope(mail_from=mail_from,
                                                   recipients=list(recipients),
                                                   received_at=time.time(),
                                                   meta=dict(meta or {})), data)
                core.notify(qid)
                return
        if self.options.get("release_via") in ("auto", "spool"):
            if await self._spool_deliver(mail_from, recipients, data, meta):
                return
            if self.options.get("release_via") == "spool":
                raise ActionError("[quarantine] release_via = \"spool\" but there is no gateway "
                                  "spool here ([queue] directory, [smtp] mode = \"gateway\")")
        if meta and meta.get("quarantine_release") and len(recipients) == 1:
            # the relay may lead back through this filter (a milter on the same Postfix, or the
            # gateway itself): a signed header lets `decide` deliver it instead of holding it again
            data = self.release_header(meta["quarantine_release"], recipients[0]) + data
        await self.relay(mail_from, recipients, data)

    RELEASE_HEADER = "X-Filterd-Released"

    def release_header(self, entry_id: str, recipient: str) -> bytes:
        from .tokens import _b36

        exp = _b36(int(time.time() + 86400))
        sig = self.signer.mac("released", entry_id, recipient.lower(), exp)
        return f"{self.RELEASE_HEADER}: {entry_id}-{exp}-{sig}\r\n".encode()

    def check_release_header(self, value: str, recipient: str) -> bool:
        """True if ``value`` is a release mark this gateway made for ``recipient`` < 1 day ago."""
        try:
            entry_id, exp, sig = value.strip().lower().split("-")
            if int(exp, 36) < time.time():
                return False
        except ValueError:
            return False
        return self.signer.check_mac(sig, "released", entry_id, recipient.lower(), exp)

    async def _spool_deliver(self, mail_from, recipients, data, meta) -> bool:
        """Enqueue into the gateway's durable spool (this node's `filterd serve` in gateway
        mode delivers it; the CLI and the web process nudge its delivery core). False when no
        gateway spool exists here."""
        try:
            from ..delivery.core import RemoteNotify
            from ..queue.spool import Envelope, Spool
        except ImportError:  # the gateway is not part of this installation
            return False
        if self.config.get("queue") is None or self.config.get("smtp.mode") != "gateway":
            return False
        directory = self.config.path("queue.directory", "spool")
        if not directory.is_dir():  # no gateway ever ran with this state directory
            return False
        spool = Spool(directory, fsync=bool(self.config.get("queue.fsync", True)))
        try:
            qid = await spool.enqueue(Envelope(mail_from=mail_from, recipients=list(recipients),
                                               received_at=time.time(),
                                               meta=dict(meta or {})), data)
        finally:
            try:
                spool.close()
            except Exception:  # noqa: BLE001
                pass
        nudge = RemoteNotify(directory)
        nudge.notify(qid)
        nudge.close()
        log.info("quarantine: %s queued as %s for %s", (meta or {}).get(
            "quarantine_release", "message"), qid, ",".join(recipients))
        return True

    async def relay(self, mail_from: str, recipients: list[str], data: bytes) -> None:
        from ..mailer import MailerError, send_to_relay

        try:
            await send_to_relay(self.options["relay"], mail_from, recipients, data)
        except MailerError as exc:
            raise ActionError(f"could not hand the message to the relay "
                              f"([quarantine] relay): {exc}") from exc

    def compose(self, to: str, subject: str, text: str, html: str | None = None) -> bytes:
        msg = EmailMessage()
        msg["From"] = self.options["sender"]
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain=self.options["sender"].rpartition("@")[2]
                                                   or "localhost")
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return msg.as_bytes()

    async def send(self, to: str, subject: str, text: str, html: str | None = None) -> None:
        await self.deliver(_addr(self.options["sender"]) or "", [to],
                           self.compose(to, subject, text, html))

    # -- release by mail ----------------------------------------------------------------------
    def command_token(self, address: str) -> str | None:
        """The token if ``address`` is a sub-address of the command address, else None."""
        cmd = (self.options.get("command_address") or "").lower()
        if not cmd or "@" not in address:
            return None
        local, domain = cmd.rsplit("@", 1)
        a_local, a_domain = address.lower().rsplit("@", 1)
        prefix = local + self.options["recipient_delimiter"]
        if a_domain != domain or not a_local.startswith(prefix):
            return None
        return a_local[len(prefix):]

    async def mail_command(self, token: str, envelope_sender: str, from_header: str) -> str:
        """Act on a command mail; returns the confirmation text (also mailed to the user)."""
        try:
            entry, action = await self.entry_for_token(token)
            if self.options.get("require_sender_match"):
                senders = {_addr(envelope_sender), _addr(from_header)}
                if entry.recipient not in senders:
                    raise ActionError(f"the command came from {_addr(envelope_sender) or '<>'}, "
                                      f"not from {entry.recipient}")
            text = await self.perform(entry, action, by=f"mail from {_addr(envelope_sender)}")
        except ActionError as exc:
            log.warning("quarantine mail command refused (sender <%s>): %s", envelope_sender, exc)
            raise
        await self.send(entry.recipient, "Quarantine: done", text + "\n")
        return text
