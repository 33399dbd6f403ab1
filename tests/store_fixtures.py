"""Fixtures for the store-backed features (store, reputation, greylist, rate limit, DNSBL):
the shared Redis on 127.0.0.1:6379 with a unique key prefix per test, the embedded SQLite store,
and private redis-server processes on random ports for tests that stop and start Redis.

Import what you need: ``from store_fixtures import store, redis_prefix, ...``."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

SHARED_REDIS = os.environ.get("FILTERD_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port P <= 55535 whose cluster bus port P+10000 is free too."""
    import random

    for _ in range(200):
        p = random.randint(20000, 45000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _redis_ping(port: int, host: str = "127.0.0.1", password: str = "") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def require_shared_redis() -> None:
    if not _redis_ping(6379):
        pytest.fail("Redis is not running on 127.0.0.1:6379: start it (bash .ci/run does) — "
                    "the store tests run every feature against real Redis")


class RedisServer:
    """A private redis-server on a random loopback port that a test may stop and start."""

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None,
                 password: str = ""):
        self.port = port or free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra or [])
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (Debian package redis-server)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"), *self.extra]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if _redis_ping(self.port, password=self.password):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = (self.dir / "redis.log").read_text(errors="replace")[-2000:] \
            if (self.dir / "redis.log").exists() else ""
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


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
