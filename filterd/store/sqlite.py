"""Embedded store: one SQLite file in WAL mode, safe for several processes on one node.

Calls run synchronously on the event loop thread: each is a single indexed statement on a local
file (microseconds with ``synchronous=NORMAL`` in WAL mode), cheaper than a thread hop.
Expired rows are ignored on read and purged lazily. Hashes share one table keyed by (hash,
field), except those given a table of their own (:meth:`SQLiteStore.own_table`, the Bayes
tokens), which the ``own_tables`` table lists for every process on the file. Bitmaps and counter
arrays are a BLOB each plus a log of recent small writes (see ``_LOG_FOLD``, ``_COUNTERS_FOLD``).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from . import Store, StoreError, add_counters, copy_into, counters_from

log = logging.getLogger("filterd.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB, exp REAL);
CREATE TABLE IF NOT EXISTS hash (k TEXT, f TEXT, n INTEGER, PRIMARY KEY (k, f)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hexp (k TEXT PRIMARY KEY, exp REAL);
CREATE TABLE IF NOT EXISTS sets (k TEXT, m TEXT, PRIMARY KEY (k, m)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bitmap (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS bitmap_log (id INTEGER PRIMARY KEY, k TEXT, bits BLOB);
CREATE TABLE IF NOT EXISTS counters (k TEXT PRIMARY KEY, v BLOB);
CREATE TABLE IF NOT EXISTS counters_log (id INTEGER PRIMARY KEY, k TEXT, d BLOB);
CREATE TABLE IF NOT EXISTS own_tables (k TEXT PRIMARY KEY, t TEXT);
CREATE TABLE IF NOT EXISTS win (k TEXT, t REAL, n INTEGER);
CREATE INDEX IF NOT EXISTS win_k_t ON win (k, t);
"""

# hget_many: the fields as a VALUES list joined to the hash, one index seek per field (an
# ``IN (?, ...)`` list is first copied into a temporary index: some 15 % more work), and the
# expiry check in the same statement (a statement costs as much as a dozen seeks). Padded with
# NULLs (which match nothing) to one of 14 sizes (steps of 1.5x: little padding), so that every
# call finds its statement prepared in the connection's statement cache.
_HGET_MAX = 512
_HGET_SQL = {
    size: ("SELECT h.f, h.n FROM (VALUES " + ",".join(["(?)"] * size) + ") AS v "
           "CROSS JOIN hash AS h WHERE h.k=? AND h.f=v.column1 "
           "AND NOT EXISTS (SELECT 1 FROM hexp WHERE k=? AND exp<?)")
    for size in (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, _HGET_MAX)}
# the statement size for n fields (n <= _HGET_MAX): the smallest that holds them
_HGET_SIZE = [min(size for size in _HGET_SQL if size >= n) for n in range(_HGET_MAX + 1)]
_NULLS = (None,) * _HGET_MAX
# A hash given a table of its own (Store.own_table): rows without the key column, no expiry
# check: a look-up seeks a smaller B-tree and compares shorter keys (a quarter less time for
# the Bayes tokens of a 100,000-token database).
_OWN_HGET_SQL = {
    size: ("SELECT t.f, t.n FROM (VALUES " + ",".join(["(?)"] * size) + ") AS v "
           "CROSS JOIN {table} AS t WHERE t.f=v.column1")
    for size in _HGET_SQL}
# A bitmap is one row, its bytes one BLOB, plus a log of the bits set since it was last
# written: a small write (one learned message sets the bits of a dozen new tokens, scattered
# over the whole bitmap) appends one row to the log, one page, where setting them in the BLOB
# would rewrite a page for each token; a reader sets the logged bits in what it reads (in one
# read transaction with the BLOB); a writer folds the log into the BLOB once it holds _LOG_FOLD
# rows of the key, and a large write (bulk learning) goes to the BLOB at once, with the log.
_LOG_FOLD = 1024
_LOG_DIRECT = 4096  # positions from which a write goes to the BLOB


def _pack(positions) -> bytes:
    return struct.pack(f">{len(positions)}I", *positions)


# A counter array is kept the same way: one BLOB (big-endian int32s) plus a log of additions
# (each row: the indexes, then the deltas, big-endian), applied in order by readers and folded
# into the BLOB once the log holds _COUNTERS_FOLD additions of the key (a reader applies them in
# Python: a few milliseconds at most); a write of _COUNTERS_DIRECT or more goes to the BLOB.
_COUNTERS_FOLD = 16384
_COUNTERS_DIRECT = 4096
_LOG_COLUMN = {"bitmap": "bits", "counters": "d"}  # the packed writes' column in <table>_log


def _pack_deltas(deltas: dict[int, int]) -> bytes:
    n = len(deltas)
    return struct.pack(f">{n}I{n}i", *deltas.keys(), *deltas.values())


def _unpack_deltas(packed: bytes) -> tuple[tuple, tuple]:
    n = len(packed) // 8
    both = struct.unpack(f">{n}I{n}i", packed)
    return both[:n], both[n:]


def _set_bits(buf: bytearray, packed: bytes, grow: bool) -> None:
    """Set the bits whose positions ``packed`` holds; past the end of ``buf``: ``grow`` it, or
    leave them."""
    positions = struct.unpack(f">{len(packed) // 4}I", packed)
    if grow and positions:
        end = (max(positions) >> 3) + 1
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
    size = len(buf)
    for n in positions:
        if n >> 3 < size:
            buf[n >> 3] |= 0x80 >> (n & 7)


class SQLiteStore(Store):
    name = "sqlite"

    purge_every = 300.0

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self._next_purge = time.time() + 60
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            # page cache up to 64 MB (default 2 MB): the Bayes token table alone outgrows the
            # default, and every cache miss is a read from the OS (used only as the file grows)
            self.db.execute("PRAGMA cache_size=-65536")
            self.db.executescript(_SCHEMA)
            self._load_own_tables()
        except (sqlite3.Error, StoreError) as exc:
            raise StoreError(f"cannot open SQLite store {self.path}: {exc}") from exc

    def _load_own_tables(self) -> None:
        self._own = dict(self._x("SELECT k, t FROM own_tables").fetchall())
        self._own_sql = {t: {size: sql.format(table=t) for size, sql in _OWN_HGET_SQL.items()}
                         for t in self._own.values()}

    def own_table(self, key):
        if key in self._own:
            return
        table = "h_" + hashlib.sha256(key.encode()).hexdigest()[:16]
        with self._write():
            self._x(f"CREATE TABLE IF NOT EXISTS {table} (f TEXT PRIMARY KEY, n INTEGER) "
                    "WITHOUT ROWID")
            # (rows written under the shared table before: moved, once)
            self._x(f"INSERT INTO {table} SELECT f, n FROM hash WHERE k=? AND true "
                    "ON CONFLICT(f) DO UPDATE SET n=n+excluded.n", (key,))
            moved = self._x("DELETE FROM hash WHERE k=?", (key,)).rowcount
            self._x("INSERT OR IGNORE INTO own_tables VALUES (?,?)", (key, table))
        if moved:
            log.info("store %s: the %d fields of %s moved to a table of their own (%s; once)",
                     self.path, moved, key, table)
        self._load_own_tables()

    @contextlib.contextmanager
    def _write(self):
        """A write transaction (BEGIN IMMEDIATE): committed at the end of the block, rolled
        back when it raises."""
        self._x("BEGIN IMMEDIATE")
        try:
            yield
            self._x("COMMIT")
        except BaseException:
            self._x("ROLLBACK")
            raise

    def _x(self, sql: str, args=()):
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {self.path}: {exc}") from exc

    @staticmethod
    def _exp(ttl: float | None) -> float | None:
        return time.time() + ttl if ttl else None

    # values
    async def get(self, key):
        row = self._x("SELECT v, exp FROM kv WHERE k=?", (key,)).fetchone()
        if row is None:
            return None
        if row[1] is not None and row[1] < time.time():
            self._x("DELETE FROM kv WHERE k=?", (key,))
            return None
        v = row[0]
        return v if isinstance(v, bytes) else str(v).encode()

    async def set(self, key, value, ttl=None):
        if isinstance(value, str):
            value = value.encode()
        self._x("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, value, self._exp(ttl)))
        self._maybe_purge()

    async def delete(self, *keys):
        n = 0
        for k in keys:
            for table in ("kv", "sets", "win", "hexp", "bitmap", "bitmap_log", "counters",
                          "counters_log"):
                n += self._x(f"DELETE FROM {table} WHERE k=?", (k,)).rowcount
            n += self._hash_clear(k)
        return n

    async def expire(self, key, ttl):
        self._x("UPDATE kv SET exp=? WHERE k=?", (self._exp(ttl), key))
        self._x("INSERT OR REPLACE INTO hexp VALUES (?,?)", (key, self._exp(ttl)))

    async def incr(self, key, amount=1, ttl=None):
        now = time.time()
        with self._write():
            row = self._x("SELECT v, exp FROM kv WHERE k=?", (key,)).fetchone()
            cur, exp = 0, None
            if row is not None and (row[1] is None or row[1] >= now):
                cur, exp = int(row[0]), row[1]
            new = cur + amount
            exp = self._exp(ttl) if ttl else exp
            self._x("INSERT OR REPLACE INTO kv VALUES (?,?,?)", (key, str(new).encode(), exp))
        return new

    # hashes
    def _hash_alive(self, key: str) -> bool:
        row = self._x("SELECT exp FROM hexp WHERE k=?", (key,)).fetchone()
        if row and row[0] is not None and row[0] < time.time():
            self._hash_clear(key)
            self._x("DELETE FROM hexp WHERE k=?", (key,))
            return False
        return True

    async def hincr(self, key, counts, ttl=None):
        await self.mhincr({key: counts}, ttl)

    async def mhincr(self, items, ttl=None, bitmaps=None, counters=None):
        with self._write():
            for key, positions in (bitmaps or {}).items():
                self._bitmap_set(key, positions)
            for key, deltas in (counters or {}).items():
                self._counters_add(key, deltas)
            for key, counts in items.items():
                self._hash_alive(key)
                table = self._own.get(key)
                if table:
                    self.db.executemany(
                        f"INSERT INTO {table} VALUES (?,?) "
                        "ON CONFLICT(f) DO UPDATE SET n=n+excluded.n",
                        [(f, int(n)) for f, n in counts.items()])
                    continue
                self.db.executemany(
                    "INSERT INTO hash VALUES (?,?,?) ON CONFLICT(k,f) DO UPDATE SET n=n+excluded.n",
                    [(key, f, int(n)) for f, n in counts.items()])
                if ttl:
                    self._x("INSERT OR REPLACE INTO hexp VALUES (?,?)", (key, self._exp(ttl)))

    def data_version(self):
        # PRAGMA data_version changes when another connection (another process) commits; this
        # connection's own writes count in total_changes
        try:
            return self.db.execute("PRAGMA data_version").fetchone()[0], self.db.total_changes
        except sqlite3.Error:
            return None

    async def hget_many(self, key, fields: Iterable[str]):
        fields = fields if isinstance(fields, (list, tuple)) else list(fields)
        out: dict[str, int] = {}
        table = self._own.get(key)
        # a table of its own: no key column, no expiry check
        sqls, tail = (self._own_sql[table], ()) if table else (_HGET_SQL, (key, key, time.time()))
        for i in range(0, len(fields), _HGET_MAX):
            chunk = fields[i:i + _HGET_MAX]
            size = _HGET_SIZE[len(chunk)]
            # (f, n) rows straight into the dict: no Python loop per row
            out.update(self._x(sqls[size], (*chunk, *_NULLS[:size - len(chunk)], *tail)))
        if not out and not table:
            self._hash_alive(key)  # nothing found: maybe expired, then purge it as before
        return out

    async def hgetall(self, key):
        if not self._hash_alive(key):
            return {}
        table = self._own.get(key)
        if table:
            return dict(self._x(f"SELECT f, n FROM {table}"))
        return {f: n for f, n in self._x("SELECT f, n FROM hash WHERE k=?", (key,))}

    async def hdel(self, key, *fields):
        table = self._own.get(key)
        if table:
            return sum(self._x(f"DELETE FROM {table} WHERE f=?", (f,)).rowcount for f in fields)
        return sum(self._x("DELETE FROM hash WHERE k=? AND f=?", (key, f)).rowcount
                   for f in fields)

    def _hash_clear(self, key: str) -> int:
        table = self._own.get(key)
        if table:
            return self._x(f"DELETE FROM {table}").rowcount
        return self._x("DELETE FROM hash WHERE k=?", (key,)).rowcount

    async def mhgetall(self, keys):
        out = {k: {} for k in keys}
        for k in keys:
            if k in self._own:
                out[k] = await self.hgetall(k)
        live = [k for k in keys if k not in self._own and self._hash_alive(k)]
        for i in range(0, len(live), 500):
            chunk = live[i:i + 500]
            q = ",".join("?" * len(chunk))
            for k, f, n in self._x(f"SELECT k, f, n FROM hash WHERE k IN ({q})", chunk):
                out[k][f] = n
        return [out[k] for k in keys]

    # bitmaps and counter arrays: a BLOB each, and a log of small writes
    def _blob_parts(self, table: str, key) -> tuple[bytes, list[bytes]]:
        """The BLOB of a bitmap (``table`` "bitmap") or counter array ("counters") and the
        packed writes of its log, oldest first."""
        row = self._x(f"SELECT v FROM {table} WHERE k=?", (key,)).fetchone()
        log = self._x(f"SELECT {_LOG_COLUMN[table]} FROM {table}_log WHERE k=? ORDER BY id",
                      (key,)).fetchall()
        return (row[0] if row else b""), [packed for (packed,) in log]

    def _read_blob(self, table: str, key) -> tuple[bytes, list[bytes]]:
        """:meth:`_blob_parts` in a read transaction of its own: the BLOB and its log as of one
        moment, no fold in between."""
        self._x("BEGIN")
        try:
            return self._blob_parts(table, key)
        finally:
            self._x("COMMIT")

    async def bitmap_get(self, key, into=None):
        data, log = self._read_blob("bitmap", key)
        grow = into is None  # (a caller's buffer keeps its length)
        if into is None:
            into = bytearray(data)
        else:
            copy_into(into, data)
        for packed in log:
            _set_bits(into, packed, grow)
        return into

    async def bitmap_set(self, key, positions):
        with self._write():
            self._bitmap_set(key, positions)

    def _bitmap_set(self, key, positions) -> None:
        """:meth:`bitmap_set` inside the caller's write transaction."""
        if not positions:
            return
        packed = _pack(positions)
        if len(positions) >= _LOG_DIRECT:
            self._bitmap_fold(key, packed)
            return
        rowid = self._x("INSERT INTO bitmap_log (k, bits) VALUES (?, ?)", (key, packed)).lastrowid
        if rowid % 64 == 0 and self._x("SELECT count(*) FROM bitmap_log WHERE k=?",
                                       (key,)).fetchone()[0] >= _LOG_FOLD:
            self._bitmap_fold(key)

    def _bitmap_fold(self, key, more: bytes = b"") -> None:
        """Write the BLOB with the bits of its log (and the ``more`` packed positions) set;
        empty the log."""
        data, log = self._blob_parts("bitmap", key)
        buf = bytearray(data)
        for packed in log + [more]:
            _set_bits(buf, packed, grow=True)
        self._x("INSERT OR REPLACE INTO bitmap VALUES (?, ?)", (key, bytes(buf)))
        self._x("DELETE FROM bitmap_log WHERE k=?", (key,))

    async def counters_get(self, key, size):
        data, log = self._read_blob("counters", key)
        out = counters_from(data, size)
        for packed in log:
            add_counters(out, *_unpack_deltas(packed))
        return out

    async def counters_add(self, key, deltas):
        with self._write():
            self._counters_add(key, deltas)

    def _counters_add(self, key, deltas) -> None:
        """:meth:`counters_add` inside the caller's write transaction."""
        deltas = {int(i): int(d) for i, d in deltas.items() if d}
        if not deltas:
            return
        packed = _pack_deltas(deltas)
        if len(deltas) >= _COUNTERS_DIRECT:
            self._counters_fold(key, packed)
            return
        self._x("INSERT INTO counters_log (k, d) VALUES (?, ?)", (key, packed))
        if self._x("SELECT sum(length(d)) FROM counters_log WHERE k=?",
                   (key,)).fetchone()[0] >= 8 * _COUNTERS_FOLD:
            self._counters_fold(key)

    def _counters_fold(self, key, more: bytes = b"") -> None:
        """Write the BLOB with its log's additions (and the ``more`` packed ones) applied;
        empty the log."""
        data, log = self._blob_parts("counters", key)
        log.append(more)
        end = max([len(data) // 4] + [max(_unpack_deltas(p)[0], default=-1) + 1 for p in log])
        arr = counters_from(data, end)
        for packed in log:
            add_counters(arr, *_unpack_deltas(packed))
        if sys.byteorder == "little":
            arr.byteswap()
        self._x("INSERT OR REPLACE INTO counters VALUES (?, ?)", (key, arr.tobytes()))
        self._x("DELETE FROM counters_log WHERE k=?", (key,))

    # sets
    async def sadd(self, key, *members, ttl=None):
        n = 0
        for m in members:
            n += self._x("INSERT OR IGNORE INTO sets VALUES (?,?)", (key, m)).rowcount
        if ttl:
            self._x("INSERT OR REPLACE INTO hexp VALUES (?,?)", (key, self._exp(ttl)))
        return n

    async def srem(self, key, *members):
        return sum(self._x("DELETE FROM sets WHERE k=? AND m=?", (key, m)).rowcount
                   for m in members)

    def _set_alive(self, key: str) -> bool:
        row = self._x("SELECT exp FROM hexp WHERE k=?", (key,)).fetchone()
        if row and row[0] is not None and row[0] < time.time():
            self._x("DELETE FROM sets WHERE k=?", (key,))
            self._x("DELETE FROM hexp WHERE k=?", (key,))
            return False
        return True

    async def smembers(self, key):
        if not self._set_alive(key):
            return set()
        return {m for (m,) in self._x("SELECT m FROM sets WHERE k=?", (key,))}

    async def sismember(self, key, member):
        if not self._set_alive(key):
            return False
        return self._x("SELECT 1 FROM sets WHERE k=? AND m=?", (key, member)).fetchone() is not None

    # windows
    async def window_hit(self, key, window, now, cost=1):
        with self._write():
            self._x("DELETE FROM win WHERE k=? AND t<=?", (key, now - window))
            self._x("INSERT INTO win VALUES (?,?,?)", (key, now, cost))
            (n,) = self._x("SELECT COALESCE(SUM(n),0) FROM win WHERE k=?", (key,)).fetchone()
        return int(n)

    async def window_count(self, key, window, now):
        (n,) = self._x("SELECT COALESCE(SUM(n),0) FROM win WHERE k=? AND t>?",
                       (key, now - window)).fetchone()
        return int(n)

    async def window_check(self, key, window, now, limit, cost=1):
        with self._write():
            self._x("DELETE FROM win WHERE k=? AND t<=?", (key, now - window))
            (n,) = self._x("SELECT COALESCE(SUM(n),0) FROM win WHERE k=?", (key,)).fetchone()
            ok = n + cost <= limit
            if ok:
                self._x("INSERT INTO win VALUES (?,?,?)", (key, now, cost))
                n += cost
        self._maybe_purge()
        return int(n), ok

    def _maybe_purge(self) -> None:
        """Expired rows nobody reads again (a greylist triplet never retried) are deleted in
        one sweep every ``purge_every`` seconds, so the file does not grow without bound."""
        now = time.time()
        if now < self._next_purge:
            return
        self._next_purge = now + self.purge_every
        try:
            self._x("DELETE FROM kv WHERE exp IS NOT NULL AND exp<?", (now,))
            for table in ("hash", "sets"):
                self._x(f"DELETE FROM {table} WHERE k IN "
                        "(SELECT k FROM hexp WHERE exp IS NOT NULL AND exp<?)", (now,))
            self._x("DELETE FROM hexp WHERE exp IS NOT NULL AND exp<?", (now,))
        except StoreError:
            pass  # busy: next time

    async def keys(self, prefix):
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        now = time.time()
        found = set()
        for k, table in self._own.items():
            if k.startswith(prefix) and self._x(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                found.add(k)
        for table in ("kv", "hash", "sets", "win", "bitmap", "bitmap_log", "counters",
                      "counters_log"):
            extra = " AND (exp IS NULL OR exp>=?)" if table == "kv" else ""
            args = (like, now) if extra else (like,)
            for (k,) in self._x(f"SELECT DISTINCT k FROM {table} WHERE k LIKE ? ESCAPE '\\'{extra}",
                                args):
                found.add(k)
        return sorted(found)

    async def ping(self):
        self._x("SELECT 1")
        return True

    async def close(self):
        self.db.close()
