"""Message trace: every message's journey, as structured log lines and an index to search them.

Each event (arrival with client, envelope, symbols and the verdict per recipient; each delivery
attempt; quarantine; bounce) is written twice:

- as one JSON line appended to ``<trace dir>/YYYY-MM-DD.jsonl`` — the durable, greppable log an
  operator can ship elsewhere;
- as a row of an SQLite index (``<trace dir>/index.sqlite``, WAL) with indexes on time, id,
  sender and recipient, so ``filterd track`` answers in milliseconds for a day of mail.

Several gateway processes may write at once (SQLite WAL with a busy timeout; appends of whole
lines to the JSON log are atomic with O_APPEND for lines under PIPE_BUF... and in practice for
our line sizes on local filesystems).
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    ts REAL NOT NULL, id TEXT NOT NULL, event TEXT NOT NULL,
    sender TEXT, rcpt TEXT, client TEXT, action TEXT, score REAL, detail TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_id ON events (id);
CREATE INDEX IF NOT EXISTS events_sender ON events (sender, ts);
CREATE INDEX IF NOT EXISTS events_rcpt ON events (rcpt, ts);
"""


_last_second: tuple[int, str] = (-1, "")  # events come many a second (one tuple: thread-safe)


def iso_time(ts: float) -> str:
    """``ts`` as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC); the day is its first ten characters."""
    global _last_second
    sec = int(ts)
    last = _last_second
    if last[0] != sec:
        last = _last_second = (sec, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec)))
    return last[1]


# json.dumps(..., ensure_ascii=False) builds a new encoder on every call (only the default
# arguments share one); the trace encodes two objects per event
_encode = json.JSONEncoder(ensure_ascii=False).encode


@dataclass
class Event:
    ts: float
    id: str
    event: str  # arrival | delivered | deferred | bounced | quarantined | rejected | ...
    sender: str = ""
    rcpt: str = ""
    client: str = ""
    action: str = ""
    score: float | None = None
    detail: dict | None = None

    def to_dict(self) -> dict:
        d = {"ts": round(self.ts, 3),
             "time": iso_time(self.ts),
             "id": self.id, "event": self.event}
        for k in ("sender", "rcpt", "client", "action"):
            v = getattr(self, k)
            if v:
                d[k] = v
        if self.score is not None:
            d["score"] = self.score
        if self.detail:
            d["detail"] = self.detail
        return d

    def json_line(self, detail_json: str | None) -> str:
        """:meth:`to_dict` as one JSON line, the detail given already encoded (the index
        stores the same text: it is encoded once)."""
        d = self.to_dict()
        if d.pop("detail", None) is None or detail_json is None:
            return _encode(d)
        return _encode(d)[:-1] + ', "detail": ' + detail_json + "}"


class IndexBusy(Exception):
    """Another process holds the index's write lock (``record(..., wait=False)``): nothing of
    the batch was written; write it again where waiting is harmless."""


class TraceLog:
    """The trace of one directory. ``own_checkpoints``: this connection never checkpoints the
    WAL itself (a checkpoint syncs the disk); the owner calls :meth:`checkpoint` where waiting
    for the disk is harmless (the trace plugin: in a worker thread, every few thousand
    events)."""

    BUSY_TIMEOUT_MS = 10_000

    def __init__(self, directory: str | os.PathLike, own_checkpoints: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "index.sqlite"
        self.db = self._connect()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        if own_checkpoints:
            self.db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer: sqlite3.Connection | None = None
        self._busy_ms = self.BUSY_TIMEOUT_MS  # as _connect sets it

    def _busy_timeout(self, ms: int) -> None:
        if ms != self._busy_ms:  # a statement each: set only when it changes
            self.db.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms

    def record(self, events: list[Event], wait: bool = True) -> None:
        """Append ``events`` to the day's JSON log and to the index, in one transaction.
        ``wait=False``: when another process is writing the index, raise :class:`IndexBusy`
        at once (before anything is written) instead of waiting for its lock."""
        if not events:
            return
        self._busy_timeout(self.BUSY_TIMEOUT_MS if wait else 0)
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not wait and "locked" in str(exc):
                raise IndexBusy(str(exc)) from None
            raise
        try:
            by_day: dict[str, list[str]] = {}
            rows = []
            for e in events:
                detail = _encode(e.detail) if e.detail else None
                day = iso_time(e.ts)[:10]
                by_day.setdefault(day, []).append(e.json_line(detail))
                rows.append((e.ts, e.id, e.event, e.sender.lower(), e.rcpt.lower(), e.client,
                             e.action, e.score, detail))
            for day, lines in by_day.items():
                with open(self.dir / f"{day}.jsonl", "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
            self.db.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)", rows)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def checkpoint(self) -> None:
        """Copy the WAL into the index (PASSIVE: never waits for readers or writers), on a
        connection of its own so that a thread may run it while :meth:`record` goes on."""
        if self._checkpointer is None:
            self._checkpointer = self._connect()
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)

    def search(self, sender: str | None = None, rcpt: str | None = None,
               since: float | None = None, until: float | None = None, msg_id: str | None = None,
               limit: int = 1000) -> list[dict]:
        """Messages matching the filters, each with its whole journey (all its events).
        ``sender``/``rcpt`` match a whole address, or a domain when they start with ``@``."""
        where, args = [], []
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts <= ?")
            args.append(until)
        for col, val in (("sender", sender), ("rcpt", rcpt)):
            if val:
                val = val.lower()
                if val.startswith("@"):
                    where.append(f"{col} LIKE ?")
                    args.append("%" + val)
                else:
                    where.append(f"{col} = ?")
                    args.append(val)
        if msg_id:
            where.append("id = ?")
            args.append(msg_id)
        sql = "SELECT DISTINCT id FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts LIMIT ?"
        ids = [r[0] for r in self.db.execute(sql, (*args, limit))]
        out = []
        for i in ids:
            rows = self.db.execute("SELECT * FROM events WHERE id=? ORDER BY ts, rowid", (i,))
            events = [Event(*r[:8], json.loads(r[8]) if r[8] else None).to_dict() for r in rows]
            out.append({"id": i, "events": events, "state": final_state(events)})
        return out

    def close(self) -> None:
        self.db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()


def final_state(events: list[dict]) -> dict:
    """Per recipient, the last thing that happened to the message."""
    state: dict[str, str] = {}
    for e in events:
        if e.get("rcpt"):
            if e["event"] == "arrival":
                state[e["rcpt"]] = e.get("action", "accepted")
            else:
                state[e["rcpt"]] = e["event"]
    return state
