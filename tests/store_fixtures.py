"""Fixtures for the store-backed features (store, reputation, greylist, rate limit, DNSBL):
the shared Redis on 127.0.0.1:6379 with a unique key prefix per test, the embedded SQLite store,
and private redis-server processes on random ports for tests that stop and start Redis.

Test modules load them with ``pytest_plugins = ["store_fixtures"]``."""
from __future__ import annotations

import uuid

import pytest
from redis_helpers import SHARED_REDIS, RedisServer, require_shared_redis


@pytest.fixture
def own_redis(tmp_path):
    servers: list[RedisServer] = []

    def make(**kw) -> RedisServer:
        srv = RedisServer(tmp_path / f"redis{len(servers)}", **kw)
        servers.append(srv)
        return srv.start()

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the shared Redis; every key under it is deleted afterwards."""
    require_shared_redis()
    prefix = f"filterd-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    import redis

    r = redis.Redis.from_url(SHARED_REDIS)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request):
    """The backend name; tests using it run once per backend."""
    return request.param


@pytest.fixture
def store_overrides(backend, request, tmp_path):
    """``--set`` overrides selecting the backend under test (shared Redis, unique prefix)."""
    if backend == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        return ["store.backend=redis", f"store.url={SHARED_REDIS}", f"store.prefix={prefix}"]
    return ["store.backend=sqlite", f"store.path={tmp_path / 'store.sqlite'}"]


@pytest.fixture
async def store(backend, request, tmp_path):
    """A Store of the backend under test."""
    if backend == "redis":
        from filterd.store.redis import RedisStore

        prefix = request.getfixturevalue("redis_prefix")
        s = RedisStore.from_config({"url": SHARED_REDIS, "prefix": prefix})
    else:
        from filterd.store.sqlite import SQLiteStore

        s = SQLiteStore(tmp_path / "store.sqlite")
    yield s
    await s.close()
