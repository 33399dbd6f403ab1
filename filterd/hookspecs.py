"""Every hook a filterd plugin can implement, in the order the pipeline calls them.

This module is the reference: each docstring says what the hook receives and what its return value
means. ``docs/hooks.md`` documents each hook with an example, and a test fails when a hook here is
missing there.

Order of a transaction::

    startup (once) → connect → helo → mail_from → rcpt_to (per recipient) → data → decide
                   → modify → scanned → [hand-off by the front door]
                   → delivered | bounced | quarantined
                   → shutdown (once)

Common arguments (a hook implementation names only the ones it needs, pluggy-style):

- ``ctx`` — the :class:`filterd.pipeline.ScanContext`: ``ctx.session``, ``ctx.transaction``,
  ``ctx.message`` (``None`` before DATA), ``ctx.symbols``, ``ctx.add_symbol(...)``,
  ``ctx.set_verdict(verdict, recipient=None)``, ``ctx.services`` (DNS resolver, store, config).
- ``options`` — this plugin's own config section (a dict, with the plugin's defaults filled in).

Return contract:

- Early phases (``connect``, ``helo``, ``mail_from``, ``rcpt_to``): return ``None`` to say nothing,
  or a :class:`filterd.verdict.Verdict`. The first non-``None`` verdict whose action is not
  ``CONTINUE`` wins and later plugins are not called for that phase. ``Verdict.accept()`` ends the
  phase with acceptance (e.g. an allow-list), skipping later plugins of that phase only.
- ``data``: report findings with ``ctx.add_symbol``; return ``None`` or a ``Verdict`` that applies
  to every recipient (per-recipient outcomes go through ``ctx.set_verdict(v, recipient=addr)``). All
  plugins run; when verdicts disagree the most severe wins.
- ``decide``: runs after scores became per-recipient actions; may return a ``Verdict`` or a dict
  ``{recipient address: Verdict}`` that *replaces* the computed outcome (allow-lists, overrides).
- ``modify``: return a list of :class:`filterd.verdict.Modification` (or ``None``).
- Events (``scanned``, ``delivered``, ``bounced``, ``quarantined``): return value ignored.

Any hook may be ``async def``; the host awaits it under the plugin's timeout. A plugin that raises
or times out never crashes the server: its ``on_error`` policy (``tempfail`` by default, or
``skip``) decides, and a ``PLUGIN_ERROR``/``PLUGIN_TIMEOUT`` symbol records it.
"""
from __future__ import annotations

import pluggy

PROJECT = "filterd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Hooks called once per phase, in pipeline order, and the lifecycle hooks around them.
PHASE_HOOKS = ("connect", "helo", "mail_from", "rcpt_to", "data", "decide", "modify")
EVENT_HOOKS = ("scanned", "delivered", "bounced", "quarantined")
LIFECYCLE_HOOKS = ("startup", "shutdown")


@hookspec
def startup(options, services):
    """Called once when a pipeline is built (server start, reload, or ``filterd check``).

    Receives ``options`` (this plugin's config section) and ``services`` (the shared
    :class:`filterd.services.Services`: config, DNS resolver, store). Open connections, load data
    files, precompile patterns here. Raising makes start-up fail with the plugin named: a plugin
    that cannot work should say so at start, not on the first message. Return value ignored.
    """


@hookspec
def shutdown(options, services):
    """Called once when the pipeline is torn down (server stop or reload). Close what
    ``startup`` opened. Return value ignored; errors are logged, never raised."""


@hookspec
def connect(ctx, options):
    """A client connected. ``ctx.session`` has ``peer_ip``, ``peer_name``, ``local_ip``,
    ``front_door``. Return ``None`` or a ``Verdict`` (first non-``None`` wins): ``reject`` refuses
    the connection with a 554 greeting, ``tempfail`` with 421."""


@hookspec
def helo(ctx, helo, options):
    """The client said HELO/EHLO ``helo`` (also in ``ctx.session.helo``). Return ``None`` or a
    ``Verdict`` (first non-``None`` wins); a reject refuses the greeting."""


@hookspec
def mail_from(ctx, sender, params, options):
    """MAIL FROM: ``sender`` is the envelope sender (``""`` for the null sender ``<>``), ``params``
    the ESMTP parameters as a dict (``SIZE``, ``BODY``, ``SMTPUTF8``...). ``ctx.session.auth_user``
    says whether the client authenticated. Return ``None`` or a ``Verdict`` (first non-``None``
    wins)."""


@hookspec
def rcpt_to(ctx, recipient, options):
    """RCPT TO: ``recipient`` is a :class:`filterd.model.Recipient` (``address``, ``params``,
    ``original``). Called once per recipient. A plugin may rewrite ``recipient.address`` (alias
    expansion) or append to ``ctx.transaction.recipients``. Return ``None`` or a ``Verdict`` for
    *this* recipient (first non-``None`` wins): ``reject`` gives a 550 for this RCPT only,
    ``tempfail`` a 450/451, ``accept`` accepts it without asking later plugins."""


@hookspec
def data(ctx, message, options):
    """End of DATA: the content scan. ``message`` is a :class:`filterd.model.Message` (``raw`` bytes
    exact; ``message.parsed`` gives headers, parts, text, URLs, attachments). Report findings with
    ``ctx.add_symbol(name, score, options=[...], description=...)`` (per recipient with
    ``recipient=addr``). Return ``None`` or a ``Verdict`` for every recipient; all plugins run, the
    most severe verdict wins."""


@hookspec
def decide(ctx, options):
    """After scoring: ``ctx.score_for(addr)`` and ``ctx.action_for(addr)`` give each recipient's
    total and score action, ``ctx.recipients`` their current verdicts. Return ``None`` to keep
    them, a ``Verdict`` to set every recipient's outcome, or ``{address: Verdict}`` for some
    (used by allow/block lists and per-user policy). Later plugins see earlier changes."""


@hookspec
def modify(ctx, message, options):
    """Changes to the message before hand-off: return a list of
    :class:`filterd.verdict.Modification` (add/remove/change header, rewrite subject, replace body)
    or ``None``. ``ctx.recipients`` tells each recipient's final outcome, e.g. to add
    ``X-Spam-*`` headers only when some recipient is tagged. Plugins run in order and
    ``ctx.pending_modifications`` holds the changes earlier plugins returned, so a signer placed
    last (``[plugins] order_last``) signs the message as it will leave:
    ``filterd.rewrite.apply_modifications(message.raw, ctx.pending_modifications)``."""


@hookspec
def scanned(ctx, result):
    """Event: the data phase finished. ``result`` is the :class:`filterd.pipeline.ScanResult`
    (``result.outcomes`` per recipient with action, score and verdict; ``result.symbols``;
    ``result.modifications``). For tracing, statistics and learning (reputation, autolearn).
    Return value ignored."""


@hookspec
def delivered(ctx, recipient, response):
    """Event: the message was delivered to ``recipient`` (an address string); ``response`` is the
    next hop's reply text (or a local delivery note). For tracking and learning; return ignored."""


@hookspec
def bounced(ctx, recipient, response, permanent):
    """Event: delivery to ``recipient`` failed with ``response``; ``permanent`` is True for a final
    failure (a DSN follows) and False for a deferral that will be retried. Return ignored."""


@hookspec
def quarantined(ctx, recipient, reason):
    """Event: the message was held in quarantine for ``recipient`` with ``reason``. Return
    ignored."""
