"""The storage interface: the same tests against the embedded SQLite store and real Redis
(127.0.0.1:6379, unique key prefix per test), then the Redis configuration (password, Sentinel)
and the documented "Redis down" degrade against private redis-server processes."""
from __future__ import annotations

import asyncio
import time

import pytest
from redis_helpers import free_port

# fixtures: store, backend, store_overrides, redis_prefix, own_redis (tests/store_fixtures.py)
pytest_plugins = ["store_fixtures"]

from filterd.store import ResilientStore, StoreConnectionError, StoreUnavailable
from filterd.store.redis import RedisStore
from filterd.store.sqlite import SQLiteStore


async def test_values_round_trip_and_missing_keys_are_none(store):
    assert await store.get("v:missing") is None
    await store.set("v:a", "text")
    await store.set("v:b", b"\x00\xffbytes")
    assert await store.get("v:a") == b"text"
    assert await store.get("v:b") == b"\x00\xffbytes"
    assert await store.exists("v:a") and not await store.exists("v:missing")
    assert await store.delete("v:a", "v:missing") >= 1
    assert await store.get("v:a") is None


async def test_values_expire_after_their_ttl(store):
    await store.set("t:short", "x", ttl=0.3)
    await store.set("t:long", "y", ttl=60)
    await store.set("t:late", "z")
    await store.expire("t:late", 0.3)
    assert await store.get("t:short") == b"x"
    await asyncio.sleep(0.5)
    assert await store.get("t:short") is None
    assert await store.get("t:late") is None
    assert await store.get("t:long") == b"y"


async def test_counters_add_and_expire(store):
    assert await store.incr("c:n") == 1
    assert await store.incr("c:n", 5) == 6
    assert await store.get_int("c:n") == 6
    assert await store.get_int("c:none") == 0
    assert await store.incr("c:ttl", 2, ttl=0.3) == 2
    await asyncio.sleep(0.5)
    assert await store.get_int("c:ttl") == 0
    assert await store.incr("c:ttl", 1, ttl=60) == 1


async def test_hash_counters_one_and_many_keys(store):
    await store.hincr("h:a", {"ham": 2, "spam": 1})
    await store.hincr("h:a", {"spam": 3})
    assert await store.hgetall("h:a") == {"ham": 2, "spam": 4}
    assert await store.hget_many("h:a", ["spam", "nope"]) == {"spam": 4}
    assert await store.hgetall("h:none") == {}
    await store.mhincr({"h:b": {"x": 1}, "h:c": {"y": 7}}, ttl=60)
    assert await store.mhgetall(["h:b", "h:none", "h:c"]) == [{"x": 1}, {}, {"y": 7}]


async def test_hash_counters_expire(store):
    await store.hincr("h:ttl", {"n": 1}, ttl=0.3)
    assert await store.hgetall("h:ttl") == {"n": 1}
    await asyncio.sleep(0.5)
    assert await store.hgetall("h:ttl") == {}
    assert await store.mhgetall(["h:ttl"]) == [{}]


async def test_sets_add_remove_and_expire(store):
    assert await store.sadd("s:a", "x", "y") == 2
    assert await store.sadd("s:a", "y", "z") == 1
    assert await store.smembers("s:a") == {"x", "y", "z"}
    assert await store.sismember("s:a", "x") and not await store.sismember("s:a", "q")
    assert await store.srem("s:a", "x", "q") == 1
    assert await store.smembers("s:a") == {"y", "z"}
    await store.sadd("s:ttl", "m", ttl=0.3)
    await asyncio.sleep(0.5)
    assert await store.smembers("s:ttl") == set()
    assert not await store.sismember("s:ttl", "m")


async def test_sliding_window_counts_only_the_last_window(store):
    t = 1_000_000.0
    assert await store.window_hit("w:a", 60, t) == 1
    assert await store.window_hit("w:a", 60, t + 10, cost=3) == 4
    assert await store.window_count("w:a", 60, t + 30) == 4
    # the first hit slides out after 60 s, the weighted one after 70 s
    assert await store.window_count("w:a", 60, t + 61) == 3
    assert await store.window_hit("w:a", 60, t + 71) == 1


async def test_window_check_refuses_over_the_limit_without_recording(store):
    t = 2_000_000.0
    results = [await store.window_check("w:lim", 60, t + i, limit=3) for i in range(5)]
    assert results == [(1, True), (2, True), (3, True), (3, False), (3, False)]
    # refused attempts were not recorded: once the first hit slides out, one more passes
    assert await store.window_check("w:lim", 60, t + 60.5, limit=3) == (3, True)
    assert await store.window_check("w:cost", 60, t, limit=3, cost=5) == (0, False)


async def test_window_check_is_atomic_under_concurrency(store):
    t = time.time()
    res = await asyncio.gather(*[store.window_check("w:race", 60, t, limit=10)
                                 for _ in range(40)])
    assert sum(ok for _, ok in res) == 10
    assert await store.window_count("w:race", 60, t) == 10


async def test_json_records_and_key_listing(store):
    await store.set_json("j:rec", {"a": [1, 2], "b": "x"})
    assert await store.get_json("j:rec") == {"a": [1, 2], "b": "x"}
    assert await store.get_json("j:none") is None
    await store.hincr("j:hash", {"f": 1})
    await store.sadd("j:set", "m")
    await store.window_hit("j:win", 60, time.time())
    assert await store.keys("j:") == ["j:hash", "j:rec", "j:set", "j:win"]
    assert await store.ping()


async def test_two_store_objects_see_each_others_writes(backend, store, tmp_path, redis_prefix):
    # two processes' view of one backend: a second client on the same file / Redis prefix
    other = (SQLiteStore(tmp_path / "store.sqlite") if backend == "sqlite"
             else RedisStore.from_config({"url": "redis://127.0.0.1:6379/0",
                                          "prefix": redis_prefix}))
    try:
        await store.set("x:shared", "1")
        await other.incr("x:n")
        await store.incr("x:n")
        assert await other.get("x:shared") == b"1"
        assert await store.get_int("x:n") == 2
    finally:
        await other.close()


# -- configuration ------------------------------------------------------------------------------
async def test_redis_password_from_url_or_setting(own_redis):
    srv = own_redis(password="s3cret/+")
    from urllib.parse import quote

    good = RedisStore.from_config({"url": f"redis://:{quote('s3cret/+', safe='')}@127.0.0.1:"
                                          f"{srv.port}/1", "prefix": "p:"})
    via_setting = RedisStore.from_config({"url": f"redis://127.0.0.1:{srv.port}/1",
                                          "password": "s3cret/+", "prefix": "p:"})
    wrong = RedisStore.from_config({"url": f"redis://:nope@127.0.0.1:{srv.port}/1",
                                    "prefix": "p:"})
    try:
        await good.set("k", "v")
        assert await via_setting.get("k") == b"v"
        with pytest.raises(Exception) as err:
            await wrong.get("k")
        assert "s3cret" not in str(err.value) and "nope" not in str(err.value)
    finally:
        for s in (good, via_setting, wrong):
            await s.close()


async def test_redis_through_sentinel_finds_the_master(own_redis, tmp_path):
    master = own_redis()
    sport = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {sport}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 "
                    f"{master.port} 1\nsentinel down-after-milliseconds mymaster 5000\n")
    import shutil
    import subprocess

    proc = subprocess.Popen([shutil.which("redis-server"), str(conf), "--sentinel"],  # noqa: ASYNC220
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = None
    try:
        for _ in range(100):
            try:
                import socket
                with socket.create_connection(("127.0.0.1", sport), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        s = RedisStore.from_config({"mode": "sentinel", "sentinels": [f"127.0.0.1:{sport}"],
                                    "sentinel_service": "mymaster", "prefix": "sent:",
                                    "url": "redis://127.0.0.1/0", "timeout": "2s"})
        await s.set("k", "through-sentinel")
        import redis

        direct = redis.Redis(port=master.port)
        assert direct.get("sent:k") == b"through-sentinel"
        direct.close()
        assert "sentinel mymaster" in s.url_safe
    finally:
        if s is not None:
            await s.close()
        proc.terminate()
        proc.wait(5)


async def test_sentinel_mode_without_sentinels_is_a_clear_error():
    from filterd.store import StoreError

    with pytest.raises(StoreError, match="sentinels"):
        RedisStore.from_config({"mode": "sentinel", "sentinels": []})


# -- Redis down ---------------------------------------------------------------------------------
async def test_unreachable_redis_is_a_connection_error_quickly():
    s = RedisStore.from_config({"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "300ms"})
    t0 = time.monotonic()
    with pytest.raises(StoreConnectionError, match="127.0.0.1"):
        await s.get("k")
    assert time.monotonic() - t0 < 5  # refused at once; bounded by the timeout otherwise
    await s.close()


async def test_redis_down_falls_back_to_embedded_store_and_recovers(own_redis, tmp_path):
    srv = own_redis()
    clock = [0.0]
    rs = ResilientStore(RedisStore.from_config({"url": srv.url, "prefix": "f:",
                                                "timeout": "300ms"}),
                        lambda: SQLiteStore(tmp_path / "fallback.sqlite"), mode="fallback",
                        retry=5, clock=lambda: clock[0])
    try:
        await rs.set("k", "in-redis")
        assert rs.degraded is None
        srv.stop()
        # first call after the outage: answered by the embedded store, no exception
        assert await rs.get("k") is None
        assert rs.degraded == "fallback"
        await rs.set("k", "local")
        assert await rs.incr("n") == 1
        assert await rs.get("k") == b"local"
        srv.start()
        clock[0] = 2.0  # before the retry interval: still on the fallback
        assert await rs.get("k") == b"local"
        clock[0] = 6.0  # retry interval passed: Redis answers again and is used
        assert await rs.get("k") is None  # the restarted (empty, --save "") Redis
        assert rs.degraded is None
        await rs.set("k", "back")
        assert await rs.primary.get("k") == b"back"
    finally:
        await rs.close()


async def test_redis_down_in_skip_mode_raises_store_unavailable(own_redis, tmp_path):
    srv = own_redis()
    clock = [0.0]
    rs = ResilientStore(RedisStore.from_config({"url": srv.url, "timeout": "300ms"}),
                        lambda: SQLiteStore(tmp_path / "unused.sqlite"), mode="skip", retry=1,
                        clock=lambda: clock[0])
    try:
        await rs.set("k", "v")
        srv.stop()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            await rs.get("k")
        assert rs.degraded == "skip"
        assert not (tmp_path / "unused.sqlite").exists()
        srv.start()
        clock[0] = 2
        assert await rs.get("k") is None and rs.degraded is None
    finally:
        await rs.close()


def test_store_config_is_checked(tmp_path):
    from filterd.config import ConfigError, load

    with pytest.raises(ConfigError) as err:
        load(None, ["store.mode=sentinal", "store.redis_down.mode=tempfail"],
             use_default_path=False)
    text = str(err.value)
    assert "[store] mode" in text and "[store.redis_down] mode" in text


async def test_open_store_wraps_redis_with_the_degrade(tmp_path):
    from filterd.config import load
    from filterd.store import open_store

    cfg = load(None, [f"server.state_dir={tmp_path}", "store.backend=redis",
                      f"store.url=redis://127.0.0.1:{free_port()}/0", "store.timeout=200ms",
                      "store.redis_down.mode=fallback"], use_default_path=False)
    s = open_store(cfg)
    try:
        assert isinstance(s, ResilientStore)
        await s.set("k", "v")  # Redis is not there: lands in <state_dir>/store.sqlite
        assert s.degraded == "fallback"
        assert (tmp_path / "store.sqlite").exists()
    finally:
        await s.close()


async def test_hash_fields_can_be_deleted(store):
    await store.hincr("h:del", {"a": 1, "b": 2, "c": 3})
    assert await store.hdel("h:del", "a", "c", "zz") == 2
    assert await store.hgetall("h:del") == {"b": 2}


async def test_fetch_reads_values_and_hashes_in_one_call(store):
    await store.set("f:a", "1")
    await store.hincr("f:h", {"x": 2})
    vals, hashes = await store.fetch(["f:a", "f:none"], ["f:h", "f:nohash"])
    assert vals == [b"1", None] and hashes == [{"x": 2}, {}]
    assert await store.fetch([], []) == ([], [])


async def test_bitmaps_only_ever_gain_bits_and_read_back_whole(store):
    """bitmap_set sets bits and keeps those already set (its own and earlier writers'), in
    small writes (SQLite: logged, then folded into the bitmap) and large ones; bit n is byte
    n >> 3 under mask 0x80 >> (n & 7) on both backends; a bitmap reads back at least up to
    its last set byte, also into a caller's buffer of another length, and deleting the key
    empties it."""
    import random

    assert await store.bitmap_get("bm:none") == b""
    rng = random.Random(7)
    want = bytearray(40_000)
    sizes = [1, 30, 5000] + [rng.randrange(1, 60) for _ in range(1100)]  # past a fold
    for size in sizes:
        positions = [rng.randrange(len(want) * 8) for _ in range(size)]
        await store.bitmap_set("bm:x", positions)
        for n in positions:
            want[n >> 3] |= 0x80 >> (n & 7)
    got = await store.bitmap_get("bm:x")
    assert got.rstrip(b"\0") == bytes(want).rstrip(b"\0")
    into = bytearray(b"\xff" * 50_000)  # longer: zero-filled
    assert await store.bitmap_get("bm:x", into) is into
    assert into == want + bytes(10_000)
    short = bytearray(100)  # shorter: cut
    await store.bitmap_get("bm:x", short)
    assert short == want[:100]
    await store.bitmap_set("bm:x", [])  # nothing set: nothing changes
    assert (await store.bitmap_get("bm:x")).rstrip(b"\0") == bytes(want).rstrip(b"\0")
    await store.bitmap_set("bm:bit9", [9])
    assert (await store.bitmap_get("bm:bit9"))[:2] == b"\x00\x40"  # SETBIT numbering: bit 9
    assert "bm:x" in await store.keys("bm:")
    await store.delete("bm:x")
    assert await store.bitmap_get("bm:x") == b""


async def test_counter_arrays_add_saturate_and_read_back(store):
    """counters_add adds to 32-bit signed counters (small writes: SQLite logs them, then folds
    the log into the array; large writes go to the array), saturating at the limits in the
    order written; a read gives exactly the counters asked for, zeros past what was written;
    the stored bytes are big-endian (Redis's BITFIELD i32), and a delete empties the array."""
    import random

    from filterd.store import COUNTER_MAX, COUNTER_MIN

    assert list(await store.counters_get("ca:none", 3)) == [0, 0, 0]
    rng = random.Random(3)
    want = [0] * 3000
    writes = [{i: rng.randrange(-5, 6) for i in range(3000)}]  # a large write
    writes += [{rng.randrange(3000): rng.randrange(-1000, 1000)
                for _ in range(rng.randrange(1, 200))} for _ in range(300)]  # small: past a fold
    for deltas in writes:
        await store.counters_add("ca:x", deltas)
        for i, d in deltas.items():
            want[i] += d
    assert list(await store.counters_get("ca:x", 3000)) == want
    assert list(await store.counters_get("ca:x", 5)) == want[:5]
    assert list(await store.counters_get("ca:x", 3002)) == want + [0, 0]
    await store.mhincr({"ca:h": {"a": 1}}, counters={"ca:x": {0: 7}})  # with hash counters
    assert (await store.counters_get("ca:x", 1))[0] == want[0] + 7
    await store.counters_add("ca:sat", {1: COUNTER_MAX - 5})
    await store.counters_add("ca:sat", {1: 10, 2: COUNTER_MIN + 1})
    await store.counters_add("ca:sat", {1: -20, 2: -2})  # saturated first, then taken from
    assert list(await store.counters_get("ca:sat", 3)) == [0, COUNTER_MAX - 20, COUNTER_MIN]
    await store.counters_add("ca:be", {1: 0x01020304})
    if store.name == "redis":  # (SQLite: the same bytes in its BLOB once folded)
        assert await store.get("ca:be") == b"\0\0\0\0\x01\x02\x03\x04"
    assert "ca:x" in await store.keys("ca:")
    await store.delete("ca:x")
    assert list(await store.counters_get("ca:x", 2)) == [0, 0]


async def test_a_hash_given_a_table_of_its_own_behaves_the_same(store):
    """own_table is a hint that changes nothing a caller sees: counters, look-ups, whole
    reads, deletes of fields and of the key, listing and several keys at once behave as for
    any hash (SQLite keeps the hash in a table of its own; Redis ignores the hint)."""
    store.own_table("own:h")
    await store.hincr("own:h", {"a": 1, "b": 2})
    await store.mhincr({"own:h": {"a": 4, "c": -3}, "plain:h": {"a": 1}})
    assert await store.hget_many("own:h", ["a", "b", "c", "zz"]) == {"a": 5, "b": 2, "c": -3}
    assert await store.hget_many("own:h", [f"n{i}" for i in range(600)] + ["a"]) == {"a": 5}
    assert await store.hgetall("own:h") == {"a": 5, "b": 2, "c": -3}
    assert await store.mhgetall(["own:h", "plain:h", "none:h"]) == [
        {"a": 5, "b": 2, "c": -3}, {"a": 1}, {}]
    assert await store.hdel("own:h", "c", "zz") == 1
    assert "own:h" in await store.keys("own:") and "plain:h" not in await store.keys("own:")
    assert await store.delete("own:h") >= 1
    assert await store.hgetall("own:h") == {} and "own:h" not in await store.keys("own:")
    assert await store.hgetall("plain:h") == {"a": 1}


async def test_a_hash_moves_to_its_own_table_once_for_every_process(tmp_path):
    """SQLite: the rows a hash had in the shared table move to its own table at the first
    hint, and another store on the same file (another process) follows the move at once."""
    path = tmp_path / "s.sqlite"
    old, other = SQLiteStore(path), SQLiteStore(path)
    try:
        await old.hincr("bayes:tokens", {"t1": 3, "t2": 5})
        await old.hincr("other:h", {"x": 1})
        old.own_table("bayes:tokens")
        old.own_table("bayes:tokens")  # (again: nothing more to do)
        assert await old.hgetall("bayes:tokens") == {"t1": 3, "t2": 5}
        shared = old.db.execute("SELECT count(*) FROM hash WHERE k='bayes:tokens'").fetchone()
        assert shared == (0,)
        other.own_table("bayes:tokens")  # (what a TokenStore in another process does)
        await other.hincr("bayes:tokens", {"t1": 1})
        assert await old.hget_many("bayes:tokens", ["t1", "t2"]) == {"t1": 4, "t2": 5}
        later = SQLiteStore(path)  # opened afterwards, without the hint: the file says so
        assert await later.hgetall("bayes:tokens") == {"t1": 4, "t2": 5}
        assert await later.hgetall("other:h") == {"x": 1}
        await later.close()
    finally:
        await old.close()
        await other.close()


async def test_window_check_many_decides_each_key(store):
    t = 3_000_000.0
    await store.window_check("m:full", 60, t, limit=1)
    res = await store.window_check_many([("m:full", 60, t, 1, 1), ("m:free", 60, t, 5, 2)])
    assert res == [(1, False), (2, True)]
    assert await store.window_count("m:free", 60, t) == 2
    assert await store.window_check_many([]) == []


async def test_redis_over_tls_with_a_private_ca(own_redis, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate (Debian package openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(subprocess.run, ["openssl", "req", "-x509", "-newkey", "rsa:2048",
                    "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    tls_port = free_port()
    srv = own_redis(extra=["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                           "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                           "--tls-auth-clients", "no"])
    good = RedisStore.from_config({"url": f"rediss://localhost:{tls_port}/0", "prefix": "tls:",
                                   "tls": {"ca_file": str(cert), "verify": True}})
    untrusted = RedisStore.from_config({"url": f"rediss://localhost:{tls_port}/0",
                                        "timeout": "2s", "tls": {"verify": True}})
    try:
        await good.set("k", "over-tls")
        import redis

        plain = redis.Redis(port=srv.port)
        assert plain.get("tls:k") == b"over-tls"
        plain.close()
        with pytest.raises(StoreConnectionError):  # system CAs do not know our CA
            await untrusted.get("k")
    finally:
        await good.close()
        await untrusted.close()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three private redis-server nodes joined into a Redis Cluster (no replicas)."""
    import shutil
    import subprocess

    from redis_helpers import RedisServer, free_cluster_port

    base = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(3):
            d = base / f"n{i}"
            nodes.append(RedisServer(d, port=free_cluster_port(), extra=["--cluster-enabled", "yes",
                                               "--cluster-config-file", str(d / "nodes.conf"),
                                               "--cluster-node-timeout", "2000"]).start())
        subprocess.run([shutil.which("redis-cli"), "--cluster", "create",
                        *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        import redis

        for _ in range(100):
            info = redis.Redis(port=nodes[0].port).cluster("info")
            if (info.get("cluster_state") if isinstance(info, dict) else b"") == "ok":
                break
            time.sleep(0.1)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


GENERIC = [test_values_round_trip_and_missing_keys_are_none, test_values_expire_after_their_ttl,
           test_counters_add_and_expire, test_hash_counters_one_and_many_keys,
           test_hash_counters_expire, test_sets_add_remove_and_expire,
           test_sliding_window_counts_only_the_last_window,
           test_window_check_refuses_over_the_limit_without_recording,
           test_window_check_is_atomic_under_concurrency, test_json_records_and_key_listing,
           test_hash_fields_can_be_deleted, test_fetch_reads_values_and_hashes_in_one_call,
           test_window_check_many_decides_each_key,
           test_bitmaps_only_ever_gain_bits_and_read_back_whole,
           test_counter_arrays_add_saturate_and_read_back,
           test_a_hash_given_a_table_of_its_own_behaves_the_same]


@pytest.mark.parametrize("case", GENERIC, ids=lambda f: f.__name__[5:])
async def test_redis_cluster_mode_passes_the_generic_suite(redis_cluster, case):
    s = RedisStore.from_config({"mode": "cluster", "prefix": f"c{time.time_ns()}:",
                                "cluster_nodes": [f"127.0.0.1:{n.port}" for n in redis_cluster],
                                "timeout": "2s"})
    try:
        await case(s)
    finally:
        await s.close()


def test_filterd_store_ping_and_show(tmp_path, redis_prefix):
    import subprocess
    import sys

    conf = tmp_path / "filterd.toml"
    conf.write_text("")
    base = [sys.executable, "-m", "filterd", "store"]
    shared = ["--config", str(conf), "--set", f"server.state_dir={tmp_path}",
              "--set", "store.backend=redis", "--set", f"store.prefix={redis_prefix}"]
    p = subprocess.run([*base, "ping", *shared], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 0 and "OK" in p.stdout and "redis 127.0.0.1:6379" in p.stdout
    dead = ["--config", str(conf), "--set", "store.backend=redis", "--set",
            f"store.url=redis://:secret@127.0.0.1:{free_port()}/0"]
    p = subprocess.run([*base, "ping", *dead], capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 1 and "Connection" in p.stdout and "secret" not in p.stdout

    import redis

    r = redis.Redis()
    bucket = int(time.time() // 21600)
    for _ in range(6):
        r.hincrby(f"{redis_prefix}rep:ip:198.51.100.7", f"spam:{bucket}", 1)
    r.close()
    p = subprocess.run([*base, "show", "198.51.100.7", "--json", *shared],
                       capture_output=True, text=True, timeout=60, check=False)
    import json

    out = json.loads(p.stdout)
    assert out["ip"]["judged"] == "bad" and out["ip"]["counts"] == {"spam": 6.0}
    assert out["greylist_auto_allow_retries"] == 0
