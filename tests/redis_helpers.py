"""Helpers for tests that use Redis: free ports, the shared server check, and private
redis-server processes on random loopback ports (fixtures are in store_fixtures.py)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
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

    def start(self) -> RedisServer:
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


