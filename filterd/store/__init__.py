"""Shared state behind one interface, with two real backends.

- :class:`filterd.store.sqlite.SQLiteStore` — embedded default: one file (WAL) on this node.
- :class:`filterd.store.redis.RedisStore` — several gateway nodes share one Redis.

Everything that must survive a restart or be shared between nodes goes through a :class:`Store`:
reputation counters, greylisting triplets, rate-limit windows, Bayes tokens, the quarantine
index. Keys are strings (callers choose a ``module:`` prefix); values are bytes, integers, sets or
JSON records. Every method is async. Expiry (``ttl`` seconds) is optional everywhere.

The same test suite (``tests/test_store.py``) runs against both backends.
"""
from __future__ import annotations

import json
import logging
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

_log = logging.getLogger("filterd.store")


_ZEROS = memoryview(bytes(65536))

# A counter array's limits: 32-bit signed, additions saturate (Redis's BITFIELD OVERFLOW SAT)
COUNTER_MAX = (1 << 31) - 1
COUNTER_MIN = -(1 << 31)


def counters_from(data: bytes, size: int) -> array:
    """``size`` counters from their stored form (big-endian 32-bit, as Redis's ``BITFIELD i32``
    keeps them; past the end of ``data``: 0), as an ``array('i')`` in host byte order."""
    out = array("i", bytes(data[:size * 4]))
    if len(out) < size:
        out.frombytes(bytes(4 * (size - len(out))))
    if sys.byteorder == "little":
        out.byteswap()
    return out


def add_counters(arr: array, indexes: Sequence[int], deltas: Sequence[int]) -> None:
    """Add each delta to its counter, saturating at the limits, in order (indexes past the
    end of ``arr`` are left out)."""
    size = len(arr)
    for i, d in zip(indexes, deltas):
        if 0 <= i < size:
            v = arr[i] + d
            arr[i] = COUNTER_MAX if v > COUNTER_MAX else COUNTER_MIN if v < COUNTER_MIN else v


def copy_into(buf: bytearray, data: bytes) -> None:
    """``data`` into ``buf`` in place, cut or zero-filled to its length (no new memory the size
    of ``buf``: a reader of a large bitmap refills the same buffer)."""
    n = min(len(data), len(buf))
    buf[:n] = data[:n]
    while n < len(buf):
        step = min(len(buf) - n, len(_ZEROS))
        buf[n:n + step] = _ZEROS[:step]
        n += step


class StoreError(Exception):
    """The backend failed (Redis unreachable, database locked too long...)."""


class StoreConnectionError(StoreError):
    """The backend cannot be reached (connection refused or lost, timeout): the "Redis down"
    case that :class:`ResilientStore` degrades on. Other errors are bugs or bad data."""


class StoreUnavailable(StoreError):
    """Raised by :class:`ResilientStore` in ``skip`` mode while the shared store is down: the
    caller skips its check and reports the ``STORE_UNAVAILABLE`` symbol."""


class Store:
    """The storage interface. Backends implement the abstract methods; helpers build on them."""

    name = "abstract"

    # -- plain values -------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        raise NotImplementedError

    async def set(self, key: str, value: bytes | str, ttl: float | None = None) -> None:
        raise NotImplementedError

    async def delete(self, *keys: str) -> int:
        raise NotImplementedError

    async def exists(self, key: str) -> bool:
        return (await self.get(key)) is not None

    async def expire(self, key: str, ttl: float) -> None:
        raise NotImplementedError

    # -- counters -----------------------------------------------------------------------------
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` and return the new value; ``ttl`` (re)sets the expiry."""
        raise NotImplementedError

    async def get_int(self, key: str) -> int:
        v = await self.get(key)
        return int(v) if v is not None else 0

    # -- hashes of counters (Bayes tokens, reputation tallies) ---------------------------------
    async def hincr(self, key: str, counts: dict[str, int], ttl: float | None = None) -> None:
        """Add each ``counts[field]`` to ``key``'s field."""
        raise NotImplementedError

    async def hget_many(self, key: str, fields: Iterable[str]) -> dict[str, int]:
        """Counters of the given fields that exist (missing fields are left out)."""
        raise NotImplementedError

    async def hgetall(self, key: str) -> dict[str, int]:
        raise NotImplementedError

    async def hdel(self, key: str, *fields: str) -> int:
        """Remove fields of a hash; returns how many existed."""
        raise NotImplementedError

    def own_table(self, key: str) -> None:
        """A hint: the hash ``key`` is large, hot and never expires (the Bayes tokens), and a
        backend may keep it apart (SQLite: a table of its own, its rows moved there once, for
        every process on the file). Nothing else changes for callers; Redis ignores it."""

    async def mhincr(self, items: dict[str, dict[str, int]], ttl: float | None = None,
                     bitmaps: dict[str, Sequence[int]] | None = None,
                     counters: dict[str, dict[int, int]] | None = None) -> None:
        """Many :meth:`hincr` in one round trip: ``{key: {field: amount}}``. ``bitmaps``:
        ``{key: positions}`` for :meth:`bitmap_set`, done first (SQLite: in the same
        transaction), so that no reader sees the counters without the bits. ``counters``:
        ``{key: {index: delta}}`` for :meth:`counters_add` (SQLite: in the same
        transaction)."""
        for key, positions in (bitmaps or {}).items():
            await self.bitmap_set(key, positions)
        for key, deltas in (counters or {}).items():
            await self.counters_add(key, deltas)
        for key, counts in items.items():
            await self.hincr(key, counts, ttl)

    async def mhgetall(self, keys: list[str]) -> list[dict[str, int]]:
        """Many :meth:`hgetall` in one round trip (Bayes looks up hundreds of tokens)."""
        return [await self.hgetall(k) for k in keys]

    # -- bitmaps (the Bayes presence filter) -----------------------------------------------
    # Bit n is byte n >> 3, mask 0x80 >> (n & 7): Redis's SETBIT/GETBIT numbering. Bits are
    # only ever set (or the key deleted), so a reader's copy lacks at most bits set since.
    async def bitmap_get(self, key: str, into: bytearray | None = None) -> bytes | bytearray:
        """The whole bitmap, at least up to its last set byte (empty when there is none). With
        ``into``, it is copied into that bytearray, cut or zero-filled to its length, which is
        returned: a reader that keeps a large bitmap refills the same memory."""
        raise NotImplementedError

    async def bitmap_set(self, key: str, positions: Sequence[int]) -> None:
        """Set the bits at ``positions``; the bits already set stay set, also those another
        writer sets at the same time."""
        raise NotImplementedError

    # -- counter arrays (the Bayes linear model's weights) --------------------------------------
    # Counters numbered from 0, 32-bit signed, stored big-endian (Redis's BITFIELD i32 layout,
    # so both backends hold the same bytes); additions saturate at COUNTER_MIN / COUNTER_MAX;
    # a counter never written reads 0.
    async def counters_get(self, key: str, size: int) -> array:
        """The first ``size`` counters as an ``array('i')`` in host byte order (one read: a
        large array is read whole, not counter by counter)."""
        raise NotImplementedError

    async def counters_add(self, key: str, deltas: dict[int, int]) -> None:
        """Add ``deltas[index]`` to each counter, saturating; what other writers add at the
        same time is kept (additions commute, short of saturation)."""
        raise NotImplementedError

    # -- sets ---------------------------------------------------------------------------------
    async def sadd(self, key: str, *members: str, ttl: float | None = None) -> int:
        raise NotImplementedError

    async def srem(self, key: str, *members: str) -> int:
        raise NotImplementedError

    async def smembers(self, key: str) -> set[str]:
        raise NotImplementedError

    async def sismember(self, key: str, member: str) -> bool:
        return member in await self.smembers(key)

    # -- sliding windows (rate limits) ---------------------------------------------------------
    async def window_hit(self, key: str, window: float, now: float, cost: int = 1) -> int:
        """Record ``cost`` events at time ``now`` and return how many events fall in the last
        ``window`` seconds, this one included."""
        raise NotImplementedError

    async def window_count(self, key: str, window: float, now: float) -> int:
        raise NotImplementedError

    async def window_check(self, key: str, window: float, now: float, limit: int,
                           cost: int = 1) -> tuple[int, bool]:
        """Rate-limit primitive: if the events of the last ``window`` seconds plus ``cost`` stay
        within ``limit``, record ``cost`` events at ``now`` and return ``(new count, True)``;
        else record nothing and return ``(current count, False)`` — a client hammering a limit
        does not push its own window forward. Backends make it atomic (one round trip)."""
        n = await self.window_count(key, window, now)
        if n + cost > limit:
            return n, False
        return await self.window_hit(key, window, now, cost), True

    async def window_check_many(self, items: list[tuple]) -> list[tuple[int, bool]]:
        """Several :meth:`window_check` calls in one round trip: ``items`` are
        ``(key, window, now, limit, cost)`` tuples; each is decided on its own."""
        return [await self.window_check(*it) for it in items]

    # -- several reads in one round trip -----------------------------------------------------
    async def fetch(self, values: list[str] = (), hashes: list[str] = ()
                    ) -> tuple[list[bytes | None], list[dict[str, int]]]:
        """:meth:`get` of each of ``values`` and :meth:`hgetall` of each of ``hashes``, in one
        round trip on Redis (the per-message lookups of greylisting and reputation)."""
        return ([await self.get(k) for k in values], [await self.hgetall(k) for k in hashes])

    # -- JSON records -------------------------------------------------------------------------
    async def get_json(self, key: str) -> Any:
        v = await self.get(key)
        return None if v is None else json.loads(v)

    async def set_json(self, key: str, value: Any, ttl: float | None = None) -> None:
        await self.set(key, json.dumps(value, separators=(",", ":")), ttl)

    # -- keys ---------------------------------------------------------------------------------
    async def keys(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix`` (for admin tools; not for the hot path)."""
        raise NotImplementedError

    async def ping(self) -> bool:
        raise NotImplementedError

    def data_version(self) -> object | None:
        """A cheap marker of the data as this process sees it: it changes whenever anything
        may have been written since, by this process or another, so a caller can keep what it
        read while the marker holds. None: the backend cannot tell cheaply (read again). Expiry
        does not change it: only data that never expires may be kept this way."""
        return None

    # state reported to plugins: None when the configured backend answers, else "fallback"
    # (working on the embedded store) or "skip" (store calls raise StoreUnavailable)
    degraded: str | None = None

    async def close(self) -> None:
        pass


# Every data method of the interface; ResilientStore delegates exactly these.
DATA_METHODS = ("get", "set", "delete", "exists", "expire", "incr", "get_int", "hincr",
                "hget_many", "hgetall", "hdel", "mhincr", "mhgetall", "bitmap_get", "bitmap_set",
                "counters_get", "counters_add", "sadd", "srem", "smembers", "sismember",
                "window_hit", "window_count", "window_check", "window_check_many", "fetch",
                "get_json", "set_json", "keys")


class ResilientStore(Store):
    """The documented "Redis down" degrade around a shared (Redis) store.

    While the primary answers, every call goes to it. On a connection error or timeout
    (:class:`StoreConnectionError`) the store is marked down, logged once, and calls go to the
    fallback — the embedded SQLite store of this node (``mode="fallback"``) — or raise
    :class:`StoreUnavailable` (``mode="skip"``) so plugins skip their check with a symbol.
    Every ``retry`` seconds the next call probes the primary with a PING and switches back as soon
    as it answers. Nothing here ever tempfails a message: that choice is the caller's, and the
    shipped plugins never make it on store trouble.
    """

    def __init__(self, primary: Store, fallback_factory=None, mode: str = "fallback",
                 retry: float = 5.0, clock=None):
        import time

        self.primary = primary
        self._fallback_factory = fallback_factory
        self._fallback: Store | None = None
        self.mode = mode if fallback_factory is not None else "skip"
        self.retry = retry
        self._clock = clock or time.monotonic
        self.down_since: float | None = None
        self._next_probe = 0.0
        self.last_error = ""
        self.name = primary.name

    @property
    def degraded(self) -> str | None:  # type: ignore[override]
        return None if self.down_since is None else self.mode

    def fallback(self) -> Store:
        if self._fallback is None:
            self._fallback = self._fallback_factory()
        return self._fallback

    async def _primary_up(self) -> bool:
        if self.down_since is None:
            return True
        now = self._clock()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.retry
        try:
            await self.primary.ping()
        except StoreError:
            return False
        _log.warning("store: %s answers again after %.0fs; shared state back in use",
                     self.primary.name, now - self.down_since)
        self.down_since = None
        return True

    def _mark_down(self, exc: Exception) -> None:
        self.last_error = str(exc)
        if self.down_since is None:
            self.down_since = self._clock()
            self._next_probe = self.down_since + self.retry
            what = ("using the embedded store of this node until it returns"
                    if self.mode == "fallback" else "skipping checks that need it")
            _log.error("store: %s is down (%s); %s (next try in %gs)",
                       self.primary.name, exc, what, self.retry)

    async def _call(self, method: str, *args, **kwargs):
        if await self._primary_up():
            try:
                return await getattr(self.primary, method)(*args, **kwargs)
            except StoreConnectionError as exc:
                self._mark_down(exc)
        if self.mode == "skip":
            raise StoreUnavailable(f"shared store {self.primary.name} unavailable: "
                                   f"{self.last_error}")
        return await getattr(self.fallback(), method)(*args, **kwargs)

    async def ping(self) -> bool:
        return await self.primary.ping()

    async def close(self) -> None:
        await self.primary.close()
        if self._fallback is not None:
            await self._fallback.close()


def _delegate(method: str):
    async def call(self, *args, **kwargs):
        return await self._call(method, *args, **kwargs)

    call.__name__ = method
    call.__doc__ = getattr(Store, method).__doc__
    return call


for _m in DATA_METHODS:
    setattr(ResilientStore, _m, _delegate(_m))


def open_store(cfg) -> Store:
    """The store the config asks for (``[store] backend``). A Redis store is wrapped in a
    :class:`ResilientStore` that applies ``[store.redis_down]``."""
    from ..config import parse_duration

    section = cfg.section("store")
    if section.get("backend") == "redis":
        from .redis import RedisStore
        from .sqlite import SQLiteStore

        primary = RedisStore.from_config(section)
        down = section.get("redis_down", {}) or {}
        path = cfg.path("store.path", "store.sqlite")
        return ResilientStore(primary, lambda: SQLiteStore(path),
                              mode=down.get("mode", "fallback"),
                              retry=parse_duration(down.get("retry", "5s")))
    from .sqlite import SQLiteStore

    return SQLiteStore(cfg.path("store.path", "store.sqlite"))
