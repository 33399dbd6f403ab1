"""Redis store: several gateway nodes share state through one Redis (redis-py asyncio, with
hiredis parsing when installed). Every key gets the configured prefix.

Three ways to reach Redis (``[store] mode``): one server by URL (``redis://``, ``rediss://`` for
TLS, ``unix://``; password/user in the URL or in ``[store] password``/``username``), through
Sentinel (``sentinels`` + ``sentinel_service``: the master is looked up again after a failover),
or a Redis Cluster (``cluster_nodes``). Every operation touches one key (or is a pipeline of
single-key commands), so all of them work on a cluster.

Connection errors and timeouts become :class:`filterd.store.StoreConnectionError` (what the
"Redis down" degrade reacts to); other Redis errors become :class:`filterd.store.StoreError`.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import ssl as _ssl
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import Store, StoreConnectionError, StoreError, copy_into, counters_from

# Sliding windows are sorted sets with one member per event (an event of cost c adds c members
# "<time>:<node>:<n>:<j>"), scored by time: the count in the window is ZCARD after removing what
# fell out of it, O(log n) however busy the key. (Members written before this layout,
# "<time>:<cost>:<random>", count once each and age out within one window.)
# Atomic "record if under the limit": ARGV now, window, limit, cost, member prefix, ttl_ms.
_WINDOW_CHECK = """
local k = KEYS[1]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', k, '-inf', now - window)
local n = redis.call('ZCARD', k)
if n + cost > limit then
  return {n, 0}
end
for j = 1, cost do redis.call('ZADD', k, now, ARGV[5] .. ':' .. j) end
redis.call('PEXPIRE', k, ARGV[6])
return {n + cost, 1}
"""

# The same check over several keys in one call (not on a cluster: keys may live on other nodes).
# ARGV: now, then per key: window, limit, cost, member prefix, ttl_ms. Returns n1, ok1, n2, ok2...
_WINDOW_CHECK_MANY = """
local now = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local b = 1 + (i - 1) * 5
  local window, limit, cost = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now - window)
  local n = redis.call('ZCARD', k)
  if n + cost > limit then
    out[#out + 1] = n
    out[#out + 1] = 0
  else
    for j = 1, cost do redis.call('ZADD', k, now, ARGV[b + 4] .. ':' .. j) end
    redis.call('PEXPIRE', k, ARGV[b + 5])
    out[#out + 1] = n + cost
    out[#out + 1] = 1
  end
end
return out
"""

# GET of the first ARGV[1] keys, HGETALL of the rest, in one call.
_FETCH = """
local nv = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  if i <= nv then out[i] = redis.call('GET', k) else out[i] = redis.call('HGETALL', k) end
end
return out
"""

# HINCRBY over several keys, then PEXPIRE (ARGV[1] ms, 0 = none). ARGV: ttl, then per key:
# number of fields, field, amount, field, amount...
_MHINCR = """
local ttl = tonumber(ARGV[1])
local a = 2
for _, k in ipairs(KEYS) do
  local nf = tonumber(ARGV[a])
  for j = 1, nf do
    redis.call('HINCRBY', k, ARGV[a + 2 * j - 1], ARGV[a + 2 * j])
  end
  a = a + 1 + 2 * nf
  if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
end
return 1
"""


# SETBIT of every ARGV position (one key: works on a cluster)
_BITMAP_SET = """
local k = KEYS[1]
for i = 1, #ARGV do redis.call('SETBIT', k, ARGV[i], 1) end
return 1
"""
_BITMAP_SET_ARGS = 50_000  # positions per script call
_COUNTERS_OPS = 10_000  # additions per BITFIELD command

_NODE = secrets.token_hex(6)  # tells this process's window members from other processes'
_SEQ = itertools.count()


def _new_node() -> None:  # a forked worker draws its own token
    global _NODE
    _NODE = secrets.token_hex(6)


os.register_at_fork(after_in_child=_new_node)


def _member(now: float) -> str:
    """A window member prefix unique across processes and nodes (no random syscall per hit)."""
    return f"{now}:{_NODE}:{next(_SEQ)}"


def _hostport(s: str, default_port: int) -> tuple[str, int]:
    host, _, port = s.rpartition(":") if ":" in s else (s, "", "")
    host = host.strip("[]") or s
    return host, int(port) if port else default_port


def _wrap(fn):
    async def inner(self, *a, **kw):
        try:
            if self._init_lock is not None:
                await self._initialize()
            return await fn(self, *a, **kw)
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreConnectionError(f"Redis {self.url_safe}: {type(exc).__name__}: "
                                       f"{exc}") from exc
        except RedisError as exc:
            if "MasterNotFound" in type(exc).__name__ or "ClusterDown" in type(exc).__name__:
                raise StoreConnectionError(f"Redis {self.url_safe}: {exc}") from exc
            raise StoreError(f"Redis {self.url_safe}: {type(exc).__name__}: {exc}") from exc

    inner.__name__ = fn.__name__
    inner.__doc__ = fn.__doc__
    return inner


class RedisStore(Store):
    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "filterd:",
                 client: aioredis.Redis | None = None, socket_timeout: float = 2.0,
                 transactions: bool = True, where: str = ""):
        self.url = url
        self.url_safe = where or url.split("@")[-1]  # never log a password
        self.prefix = prefix
        self._tx = transactions  # MULTI/EXEC pipelines (not on a cluster)
        # a cluster client discovers the slots on first use; many coroutines doing that at
        # once race inside redis-py (AttributeError on a half-made connection), so the first
        # use is serialised
        self._init_lock = asyncio.Lock() if not transactions else None
        self.r = client or aioredis.from_url(url, socket_timeout=socket_timeout,
                                             socket_connect_timeout=socket_timeout,
                                             health_check_interval=30)
        self._window_check = self.r.register_script(_WINDOW_CHECK)
        # multi-key scripts: one call instead of a pipeline (standalone and Sentinel only)
        self._scripts = transactions
        self._window_check_many = self.r.register_script(_WINDOW_CHECK_MANY)
        self._fetch = self.r.register_script(_FETCH)
        self._mhincr = self.r.register_script(_MHINCR)
        self._bitmap_set = self.r.register_script(_BITMAP_SET)

    async def _initialize(self) -> None:
        async with self._init_lock:
            if self._init_lock is None:
                return
            await self.r.initialize()
            self._init_lock = None

    @classmethod
    def from_config(cls, section: dict) -> RedisStore:
        """Build from the ``[store]`` section (URL, credentials, TLS, Sentinel or Cluster)."""
        from ..config import parse_duration

        url = section.get("url") or "redis://127.0.0.1:6379/0"
        prefix = section.get("prefix", "filterd:")
        timeout = parse_duration(section.get("timeout") or "500ms")
        mode = section.get("mode") or "standalone"
        tls = section.get("tls") or {}
        parts = urlsplit(url)
        use_tls = parts.scheme == "rediss" or bool(tls.get("enabled"))
        password = section.get("password") or (unquote(parts.password) if parts.password else None)
        username = section.get("username") or (unquote(parts.username) if parts.username else None)
        common = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                      "password": password or None, "username": username or None}
        ssl_kw: dict = {}
        if use_tls:
            ssl_kw = {"ssl": True, "ssl_ca_certs": tls.get("ca_file") or None,
                          "ssl_certfile": tls.get("cert_file") or None,
                          "ssl_keyfile": tls.get("key_file") or None,
                          "ssl_cert_reqs": _ssl.CERT_REQUIRED if tls.get("verify", True)
                          else _ssl.CERT_NONE,
                          "ssl_check_hostname": bool(tls.get("verify", True))}
        where = parts.hostname or url
        if mode == "sentinel":
            from redis.asyncio.sentinel import Sentinel

            sentinels = [_hostport(s, 26379) for s in section.get("sentinels") or []]
            if not sentinels:
                raise StoreError("[store] mode = \"sentinel\" needs [store] sentinels = "
                                 "[\"host:port\", ...]")
            service = section.get("sentinel_service") or "mymaster"
            skw = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
            if section.get("sentinel_password"):
                skw["password"] = section["sentinel_password"]
            db = int((parts.path or "/0").strip("/") or 0)
            sentinel = Sentinel(sentinels, sentinel_kwargs=skw, db=db, **common, **ssl_kw)
            client = sentinel.master_for(service, max_connections=int(
                section.get("max_connections", 64)))
            where = f"sentinel {service} via {','.join(f'{h}:{p}' for h, p in sentinels)}"
            return cls(url, prefix, client=client, where=where)
        if mode == "cluster":
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            nodes = [_hostport(n, 6379) for n in section.get("cluster_nodes") or []]
            if not nodes:
                nodes = [(parts.hostname or "127.0.0.1", parts.port or 6379)]
            client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes],
                                  max_connections=int(section.get("max_connections", 64)),
                                  **common, **ssl_kw)
            where = f"cluster {','.join(f'{h}:{p}' for h, p in nodes)}"
            return cls(url, prefix, client=client, transactions=False, where=where)
        # credentials travel as arguments (redis-py lets URL credentials win over them)
        netloc = parts.netloc.rpartition("@")[2]
        scheme = "rediss" if use_tls and parts.scheme == "redis" else parts.scheme
        plain_url = parts._replace(scheme=scheme, netloc=netloc).geturl()
        client = aioredis.from_url(plain_url, health_check_interval=30,
                                   max_connections=int(section.get("max_connections", 64)),
                                   **{k: v for k, v in common.items()
                                      if v is not None or k.startswith("socket")},
                                   **{k: v for k, v in ssl_kw.items() if k != "ssl"})
        return cls(url, prefix, client=client, where=f"{where}:{parts.port or 6379}"
                   if parts.hostname else url.split("@")[-1])

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
        async with self.r.pipeline(transaction=self._tx) as p:
            p.incrby(self.k(key), amount)
            if ttl:
                p.pexpire(self.k(key), self._ms(ttl))
            res = await p.execute()
        return int(res[0])

    @_wrap
    async def hincr(self, key, counts, ttl=None):
        await self.mhincr({key: counts}, ttl)

    @_wrap
    async def mhincr(self, items, ttl=None, bitmaps=None, counters=None):
        for key, positions in (bitmaps or {}).items():  # (first: no reader sees counts
            await self.bitmap_set(key, positions)  # without the bits)
        for key, deltas in (counters or {}).items():
            await self.counters_add(key, deltas)
        if not items:
            return
        if self._scripts:
            args: list = [self._ms(ttl) or 0]
            for counts in items.values():
                args.append(len(counts))
                for f, n in counts.items():
                    args += [f, int(n)]
            await self._mhincr(keys=[self.k(k) for k in items], args=args)
            return
        async with self.r.pipeline(transaction=False) as p:
            for key, counts in items.items():
                for f, n in counts.items():
                    p.hincrby(self.k(key), f, int(n))
                if ttl:
                    p.pexpire(self.k(key), self._ms(ttl))
            await p.execute()

    @_wrap
    async def bitmap_get(self, key, into=None):
        data = await self.r.get(self.k(key)) or b""
        if into is None:
            return data
        copy_into(into, data)
        return into

    @_wrap
    async def bitmap_set(self, key, positions):
        positions = list(positions)
        for i in range(0, len(positions), _BITMAP_SET_ARGS):
            await self._bitmap_set(keys=[self.k(key)], args=positions[i:i + _BITMAP_SET_ARGS])

    @_wrap
    async def counters_get(self, key, size):
        # (GETRANGE: only what is asked for; a key never written reads as zeros)
        data = await self.r.getrange(self.k(key), 0, 4 * size - 1) if size > 0 else b""
        return counters_from(data or b"", size)

    @_wrap
    async def counters_add(self, key, deltas):
        ops: list = []
        for i, d in deltas.items():
            if d:
                ops += ["INCRBY", "i32", f"#{int(i)}", int(d)]
        for j in range(0, len(ops), 4 * _COUNTERS_OPS):
            # (one command each: atomic; OVERFLOW SAT holds for the INCRBYs after it)
            await self.r.execute_command("BITFIELD", self.k(key), "OVERFLOW", "SAT",
                                         *ops[j:j + 4 * _COUNTERS_OPS])

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
    async def hdel(self, key, *fields):
        if not fields:
            return 0
        return int(await self.r.hdel(self.k(key), *fields))

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
        async with self.r.pipeline(transaction=self._tx) as p:
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
        prefix = _member(now)
        async with self.r.pipeline(transaction=self._tx) as p:
            p.zremrangebyscore(k, "-inf", now - window)
            p.zadd(k, {f"{prefix}:{j}": now for j in range(1, int(cost) + 1)})
            p.zcard(k)
            p.pexpire(k, self._ms(window) or 1000)
            res = await p.execute()
        return int(res[2])

    @_wrap
    async def window_count(self, key, window, now):
        return int(await self.r.zcount(self.k(key), f"({now - window}", "+inf"))

    @_wrap
    async def window_check(self, key, window, now, limit, cost=1):
        n, ok = await self._window_check(keys=[self.k(key)],
                                         args=[now, window, int(limit), int(cost), _member(now),
                                               self._ms(window) or 1000])
        return int(n), bool(ok)

    @_wrap
    async def window_check_many(self, items):
        if not items:
            return []
        if not self._scripts:  # cluster: keys may live on different nodes
            return [await self.window_check(*it) for it in items]
        now = items[0][2]
        args: list = [now]
        for key, window, now_i, limit, *rest in items:
            cost = int(rest[0]) if rest else 1
            args += [window, int(limit), cost, _member(now_i), self._ms(window) or 1000]
        res = await self._window_check_many(keys=[self.k(it[0]) for it in items], args=args)
        return [(int(res[i]), bool(res[i + 1])) for i in range(0, len(res), 2)]

    @_wrap
    async def fetch(self, values=(), hashes=()):
        values, hashes = list(values), list(hashes)
        if not values and not hashes:
            return [], []
        if self._scripts:
            res = await self._fetch(keys=[self.k(k) for k in values + hashes],
                                    args=[len(values)])
            hres = [dict(zip(h[0::2], h[1::2])) for h in res[len(values):]]
        else:
            async with self.r.pipeline(transaction=False) as p:
                for k in values:
                    p.get(self.k(k))
                for k in hashes:
                    p.hgetall(self.k(k))
                res = await p.execute()
            hres = res[len(values):]
        vals = [v if v else None for v in res[:len(values)]]
        return vals, [{f.decode(): int(v) for f, v in d.items()} for d in hres]

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


