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
from typing import Any, Iterable


class StoreError(Exception):
    """The backend failed (Redis unreachable, database locked too long...)."""


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

    async def mhincr(self, items: dict[str, dict[str, int]], ttl: float | None = None) -> None:
        """Many :meth:`hincr` in one round trip: ``{key: {field: amount}}``."""
        for key, counts in items.items():
            await self.hincr(key, counts, ttl)

    async def mhgetall(self, keys: list[str]) -> list[dict[str, int]]:
        """Many :meth:`hgetall` in one round trip (Bayes looks up hundreds of tokens)."""
        return [await self.hgetall(k) for k in keys]

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

    async def close(self) -> None:
        pass


def open_store(cfg) -> Store:
    """The store the config asks for (``[store] backend``)."""
    section = cfg.section("store")
    if section.get("backend") == "redis":
        from .redis import RedisStore

        return RedisStore(section.get("url"), prefix=section.get("prefix", "filterd:"))
    from .sqlite import SQLiteStore

    return SQLiteStore(cfg.path("store.path", "store.sqlite"))
