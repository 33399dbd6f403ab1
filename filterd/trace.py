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
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.ts)),
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


class TraceLog:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / "index.sqlite", timeout=10, isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def record(self, events: list[Event]) -> None:
        if not events:
            return
        by_day: dict[str, list[str]] = {}
        for e in events:
            day = time.strftime("%Y-%m-%d", time.gmtime(e.ts))
            by_day.setdefault(day, []).append(json.dumps(e.to_dict(), ensure_ascii=False))
        for day, lines in by_day.items():
            with open(self.dir / f"{day}.jsonl", "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                [(e.ts, e.id, e.event, e.sender.lower(), e.rcpt.lower(), e.client, e.action,
                  e.score, json.dumps(e.detail, ensure_ascii=False) if e.detail else None)
                 for e in events])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

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
