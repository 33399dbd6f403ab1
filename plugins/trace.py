"""Trace: records every message's journey (arrival with client, envelope, symbols and verdict per
recipient; deliveries, deferrals, bounces, quarantine) in the message trace that
``filterd track`` searches, and stamps each message with a filterd message ID header."""
from __future__ import annotations

import asyncio
import logging
import time

from filterd.hookspecs import hookimpl
from filterd.trace import Event, IndexBusy, TraceLog
from filterd.verdict import Modification

log = logging.getLogger("filterd.trace")

CONFIG = """
# Directory of the trace log (JSON lines per day) and its index; "" = <state_dir>/trace
directory = ""
# Header carrying filterd's ID of the message ("" = none). `filterd track --id` finds it.
id_header = "X-Filterd-ID"
# Events are written behind, off the message's path: the writer waits this long for more
# events so that under load many messages share one append and one index transaction.
# "0s" writes each message's events as soon as the previous write is done.
write_delay = "50ms"
"""


# The WAL is copied into the index (a disk sync, in a worker thread) after this many events.
CHECKPOINT_EVENTS = 2000


class Plugin:
    def __init__(self, options, services):
        self.options = options
        self.services = services
        self.log: TraceLog | None = None
        self.pending: list[Event] = []
        self._writer: asyncio.Task | None = None
        from filterd.config import parse_duration

        self.delay = parse_duration(options.get("write_delay") or "0s")
        self._unsynced = 0  # events written since the last WAL checkpoint

    def _log(self) -> TraceLog:
        if self.log is None:  # opened on first use: `filterd check` never needs it
            cfg = self.services.config
            self.log = TraceLog(self.options.get("directory") or cfg.state_dir / "trace",
                                own_checkpoints=True)
        return self.log

    def _write(self, events, wait: bool = True) -> None:
        self._log().record(events, wait)  # one writer at a time: the _drain task

    async def record(self, events) -> None:
        """Queue ``events`` for the trace; the message does not wait for the disk. One writer
        at a time writes what has queued up after waiting ``write_delay`` for more, so many
        messages' events share one append and one index transaction.

        The writer appends in the event loop: a batch costs some 25 µs per event, far less
        than handing it to a worker thread, whose work would contend for the GIL with every
        message in flight. Only what may wait goes to a thread: a batch that finds another
        gateway process writing the index (its lock is shared), and the WAL checkpoint
        (it syncs the disk) every CHECKPOINT_EVENTS events."""
        self.pending.extend(events)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        if self.delay > 0:
            await asyncio.sleep(self.delay)  # let more events join this write
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                try:
                    self._write(batch, wait=False)
                except IndexBusy:
                    await asyncio.to_thread(self._write, batch)
                self._unsynced += len(batch)
                if self._unsynced >= CHECKPOINT_EVENTS:
                    self._unsynced = 0
                    await asyncio.to_thread(self._log().checkpoint)
            except Exception:  # noqa: BLE001 - the trace must never cost a message
                log.exception("trace: %d events could not be written to %s", len(batch),
                              self.options.get("directory") or "<state_dir>/trace")

    async def flush(self) -> None:
        """Wait until every queued event is written."""
        while self.pending or (self._writer is not None and not self._writer.done()):
            if self._writer is None or self._writer.done():
                self._writer = asyncio.ensure_future(self._drain())
            await asyncio.shield(self._writer)

    @hookimpl
    def modify(self, ctx):
        name = self.options.get("id_header")
        if name:
            return [Modification.remove_header(name),
                    Modification.add_header(name, ctx.transaction.id)]

    @hookimpl
    async def scanned(self, ctx, result):
        if ctx.session.front_door == "check":
            return  # offline scans are not mail traffic
        tx, s = ctx.transaction, ctx.session
        now = time.time()
        symbols = [f"{sym.name}({sym.score:g})" for sym in result.symbols]
        events = []
        for addr, o in result.outcomes.items():
            events.append(Event(now, tx.id, "arrival", tx.mail_from, addr, s.peer_ip,
                                o.action.value, o.score, {
                                    "helo": s.helo, "client_name": s.peer_name,
                                    "auth": s.auth_user, "front_door": s.front_door,
                                    "size": ctx.message.size if ctx.message else 0,
                                    "message_id": (ctx.message.parsed.message_id
                                                   if ctx.message else ""),
                                    "subject": (ctx.message.parsed.subject[:200]
                                                if ctx.message else ""),
                                    "symbols": symbols,
                                    "reason": o.verdict.reason,
                                }))
        await self.record(events)

    async def _event(self, ctx, kind, recipient, detail):
        if ctx is None or ctx.session.front_door == "check":
            return
        tx = ctx.transaction
        await self.record([Event(time.time(), tx.id, kind, tx.mail_from, recipient,
                                 ctx.session.peer_ip, "", None, detail)])

    @hookimpl
    async def delivered(self, ctx, recipient, response):
        await self._event(ctx, "delivered", recipient, {"response": response})

    @hookimpl
    async def bounced(self, ctx, recipient, response, permanent):
        await self._event(ctx, "bounced" if permanent else "deferred", recipient,
                          {"response": response})

    @hookimpl
    async def quarantined(self, ctx, recipient, reason):
        await self._event(ctx, "quarantined", recipient, {"reason": reason})

    @hookimpl
    async def shutdown(self):
        await self.flush()
        if self.log is not None:
            self.log.close()
