"""The quarantine store: message bytes on disk, the index in the shared store.

Files: ``<directory>/<yyyy-mm-dd>/<message id>.eml``, written to a temporary name, fsync'd and
renamed, byte-exact as received (with the gateway's modifications, if any, applied by the
caller). One file per message, however many recipients it was held for.

Index (``services.store``, so with ``[store] backend = "redis"`` every node sees it), keys under
``quarantine:``:

- ``entry:<id>``        JSON record of one (message, recipient) pair — see :class:`Entry`
- ``rcpt:<address>``    set of entry ids held for a recipient
- ``all``               set of every entry id (list, purge, admin summary)
- ``refs:<message id>`` set of entry ids still using a message file
- ``body:<message id>`` the message bytes too, when ``share_messages`` is on
- ``used:<action>:<id>`` single-use markers of action tokens
- ``digest:<address>``  when the last digest was sent and up to which entry it reported
- ``prefs:<address>``   the user's settings (digest frequency)
- ``allow:<address>`` / ``block:<address>`` senders a user always allows / blocks
"""
from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

P = "quarantine:"


@dataclass
class Entry:
    id: str
    message_id: str  # the file's id (shared by every entry of the same message)
    recipient: str
    sender: str  # envelope sender
    from_header: str
    subject: str
    date: str  # Date: header as sent
    received_at: float
    score: float
    symbols: list = field(default_factory=list)  # [[name, score], ...]
    reason: str = ""
    size: int = 0
    queue_id: str = ""
    node: str = ""
    path: str = ""
    status: str = "held"  # held, released, deleted
    expires: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class MessageMissing(Exception):
    """The entry exists but its message bytes are on another node (or were removed)."""


class QuarantineStore:
    def __init__(self, store, directory: Path, retention: float, share_messages: bool = False,
                 node: str = ""):
        self.store = store
        self.directory = Path(directory)
        self.retention = retention
        self.share_messages = share_messages
        self.node = node or os.uname().nodename
        self.list_changes = 0

    # -- files --------------------------------------------------------------------------------
    def _write_file(self, message_id: str, data: bytes, day: str) -> Path:
        d = self.directory / day
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{message_id}.eml"
        tmp = d / f".{message_id}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path

    async def add_message(self, data: bytes, entries: list[Entry]) -> list[Entry]:
        """Store the message once and index one entry per recipient. Returns the entries with
        ids, paths and expiry filled in. The file is on disk (fsync'd) before the index names it."""
        now = time.time()
        message_id = secrets.token_hex(10)
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        path = await asyncio.to_thread(self._write_file, message_id, data, day)
        ttl = self.retention + 86400  # index outlives the purge date a little: purge removes it
        if self.share_messages:
            await self.store.set(f"{P}body:{message_id}", data, ttl=ttl)
        for e in entries:
            e.id = e.id or secrets.token_hex(6)
            e.message_id = message_id
            e.path = str(path)
            e.node = self.node
            e.received_at = e.received_at or now
            e.expires = e.received_at + self.retention
            e.size = len(data)
            await asyncio.gather(
                self.store.set_json(f"{P}entry:{e.id}", e.to_dict(), ttl=ttl),
                self.store.sadd(f"{P}rcpt:{e.recipient.lower()}", e.id),
                self.store.sadd(f"{P}all", e.id),
                self.store.sadd(f"{P}refs:{message_id}", e.id))
        return entries

    async def get(self, entry_id: str) -> Entry | None:
        d = await self.store.get_json(f"{P}entry:{entry_id}")
        return Entry.from_dict(d) if d else None

    async def save(self, entry: Entry) -> None:
        ttl = max(entry.expires - time.time(), 0) + 86400
        await self.store.set_json(f"{P}entry:{entry.id}", entry.to_dict(), ttl=ttl)

    def local_path(self, entry: Entry) -> Path:
        """Where this node keeps the entry's file: the same day/name under OUR directory (a
        directory shared between nodes works, a node-local one is only found on its node)."""
        p = Path(entry.path)
        return self.directory / p.parent.name / p.name

    async def read_message(self, entry: Entry) -> bytes:
        try:
            return await asyncio.to_thread(self.local_path(entry).read_bytes)
        except FileNotFoundError:
            pass
        data = await self.store.get(f"{P}body:{entry.message_id}")
        if data is not None:
            return data
        raise MessageMissing(
            f"quarantined message {entry.message_id} (entry {entry.id}) is not on this node "
            f"({self.node}); it was held on {entry.node} at {entry.path}. Release it there, or "
            f"set [quarantine] share_messages = true / share the quarantine directory")

    async def entries_for(self, recipient: str, status: str | None = "held") -> list[Entry]:
        ids = await self.store.smembers(f"{P}rcpt:{recipient.lower()}")
        return await self._load(ids, status)

    async def all_entries(self, status: str | None = "held") -> list[Entry]:
        return await self._load(await self.store.smembers(f"{P}all"), status)

    async def _load(self, ids, status) -> list[Entry]:
        out = []
        for i in ids:
            e = await self.get(i)
            if e is None:
                continue
            if status is None or e.status == status:
                out.append(e)
        out.sort(key=lambda e: e.received_at, reverse=True)
        return out

    async def remove(self, entry: Entry) -> None:
        """Drop an entry from the index; remove the message file when no entry uses it."""
        await self.store.delete(f"{P}entry:{entry.id}")
        await self.store.srem(f"{P}rcpt:{entry.recipient.lower()}", entry.id)
        await self.store.srem(f"{P}all", entry.id)
        await self.store.srem(f"{P}refs:{entry.message_id}", entry.id)
        if not await self.store.smembers(f"{P}refs:{entry.message_id}"):
            await self.store.delete(f"{P}body:{entry.message_id}", f"{P}refs:{entry.message_id}")
            try:
                self.local_path(entry).unlink()
            except FileNotFoundError:
                pass

    async def purge(self, now: float | None = None) -> int:
        """Remove expired entries (and index rows whose record already expired). Returns how
        many entries were removed."""
        now = now or time.time()
        n = 0
        for i in await self.store.smembers(f"{P}all"):
            e = await self.get(i)
            if e is None:
                await self.store.srem(f"{P}all", i)
                n += 1
            elif e.expires <= now or e.status != "held":
                await self.remove(e)
                n += 1
        await self._sweep_files(now)
        return n

    async def _sweep_files(self, now: float) -> None:
        """Files left behind when another node removed the last entry of a message held here."""
        if not self.directory.is_dir():
            return
        for day in self.directory.iterdir():
            if not day.is_dir():
                continue
            for f in day.glob("*.eml"):
                try:
                    old = f.stat().st_mtime < now - self.retention
                except FileNotFoundError:
                    continue
                if old and not await self.store.smembers(f"{P}refs:{f.stem}"):
                    f.unlink(missing_ok=True)
            try:
                day.rmdir()  # only when empty
            except OSError:
                pass

    # -- single use, per-user data ------------------------------------------------------------
    async def mark_used(self, action: str, entry_id: str, ttl: float) -> bool:
        """True the first time only (atomic on both backends: INCR)."""
        return await self.store.incr(f"{P}used:{action}:{entry_id}", 1, ttl=ttl) == 1

    async def prefs(self, recipient: str) -> dict:
        return await self.store.get_json(f"{P}prefs:{recipient.lower()}") or {}

    async def set_prefs(self, recipient: str, prefs: dict) -> None:
        await self.store.set_json(f"{P}prefs:{recipient.lower()}", prefs)

    async def list_add(self, kind: str, recipient: str, sender: str) -> None:
        other = "block" if kind == "allow" else "allow"
        await self.store.srem(f"{P}{other}:{recipient.lower()}", sender.lower())
        await self.store.sadd(f"{P}{kind}:{recipient.lower()}", sender.lower())
        await self.store.incr(f"{P}lists:version")
        self.list_changes += 1  # this process sees its own changes at once

    async def lists_version(self) -> int:
        return await self.store.get_int(f"{P}lists:version")

    async def list_get(self, kind: str, recipient: str) -> set[str]:
        return await self.store.smembers(f"{P}{kind}:{recipient.lower()}")
