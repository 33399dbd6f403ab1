"""Redis store: several gateway nodes share state through one Redis (redis-py asyncio, with
hiredis parsing when installed). Every key gets the configured prefix.

Connection errors become :class:`filterd.store.StoreError`, so callers handle "Redis down" in one
way whatever the backend.
"""
from __future__ import annotations

import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import Store, StoreError


def _wrap(fn):
    async def inner(self, *a, **kw):
        try:
            return await fn(self, *a, **kw)
        except RedisError as exc:
            raise StoreError(f"Redis {self.url_safe}: {exc}") from exc
        except OSError as exc:
            raise StoreError(f"Redis {self.url_safe}: {exc}") from exc

    inner.__name__ = fn.__name__
    inner.__doc__ = fn.__doc__
    return inner


class RedisStore(Store):
    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "filterd:",
                 client: "aioredis.Redis | None" = None, socket_timeout: float = 2.0):
        self.url = url
        self.url_safe = url.split("@")[-1]  # never log a password
        self.prefix = prefix
        self.r = client or aioredis.from_url(url, socket_timeout=socket_timeout,
                                             socket_connect_timeout=socket_timeout,
                                             health_check_interval=30)

    def k(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def _ms(ttl):
        return int(ttl * 1000) if ttl else None

    @_wrap
    async def get(self, key):
        return await self.r.get(self.k(key))

    @_wrap
    async def set(self, key, value, ttl=None):
        await self.r.set(self.k(key), value, px=self._ms(ttl))

    @_wrap
    async def delete(self, *keys):
        if not keys:
            return 0
        return await self.r.delete(*[self.k(k) for k in keys])

    @_wrap
    async def expire(self, key, ttl):
        await self.r.pexpire(self.k(key), self._ms(ttl))

    @_wrap
    async def incr(self, key, amount=1, ttl=None):
        async with self.r.pipeline(transaction=True) as p:
            p.incrby(self.k(key), amount)
            if ttl:
                p.pexpire(self.k(key), self._ms(ttl))
            res = await p.execute()
        return int(res[0])

    @_wrap
    async def hincr(self, key, counts, ttl=None):
        await self.mhincr({key: counts}, ttl)

    @_wrap
    async def mhincr(self, items, ttl=None):
        async with self.r.pipeline(transaction=False) as p:
            for key, counts in items.items():
                for f, n in counts.items():
                    p.hincrby(self.k(key), f, int(n))
                if ttl:
                    p.pexpire(self.k(key), self._ms(ttl))
            await p.execute()

    @_wrap
    async def hget_many(self, key, fields):
        fields = list(fields)
        if not fields:
            return {}
        vals = await self.r.hmget(self.k(key), fields)
        return {f: int(v) for f, v in zip(fields, vals, strict=True) if v is not None}

    @_wrap
    async def hgetall(self, key):
        d = await self.r.hgetall(self.k(key))
        return {f.decode(): int(v) for f, v in d.items()}

    @_wrap
    async def mhgetall(self, keys):
        async with self.r.pipeline(transaction=False) as p:
            for k in keys:
                p.hgetall(self.k(k))
            res = await p.execute()
        return [{f.decode(): int(v) for f, v in d.items()} for d in res]

    @_wrap
    async def sadd(self, key, *members, ttl=None):
        if not members:
            return 0
        async with self.r.pipeline(transaction=True) as p:
            p.sadd(self.k(key), *members)
            if ttl:
                p.pexpire(self.k(key), self._ms(ttl))
            res = await p.execute()
        return int(res[0])

    @_wrap
    async def srem(self, key, *members):
        if not members:
            return 0
        return await self.r.srem(self.k(key), *members)

    @_wrap
    async def smembers(self, key):
        return {m.decode() for m in await self.r.smembers(self.k(key))}

    @_wrap
    async def sismember(self, key, member):
        return bool(await self.r.sismember(self.k(key), member))

    @_wrap
    async def window_hit(self, key, window, now, cost=1):
        k = self.k(key)
        async with self.r.pipeline(transaction=True) as p:
            p.zremrangebyscore(k, "-inf", now - window)
            # members carry their cost so a weighted hit counts as `cost` events
            p.zadd(k, {f"{now}:{cost}:{uuid.uuid4().hex[:8]}": now})
            p.zrange(k, 0, -1)
            p.pexpire(k, self._ms(window) or 1000)
            res = await p.execute()
        return sum(int(m.decode().split(":")[1]) for m in res[2])

    @_wrap
    async def window_count(self, key, window, now):
        members = await self.r.zrangebyscore(self.k(key), f"({now - window}", "+inf")
        return sum(int(m.decode().split(":")[1]) for m in members)

    @_wrap
    async def keys(self, prefix):
        out = []
        async for k in self.r.scan_iter(match=self.k(prefix) + "*", count=1000):
            out.append(k.decode()[len(self.prefix):])
        return sorted(out)

    @_wrap
    async def ping(self):
        return bool(await self.r.ping())

    async def close(self):
        try:
            await self.r.aclose()
        except (RedisError, OSError):
            pass


