"""The delivery core: takes messages out of the spool and delivers them.

- :meth:`DeliveryCore.start` recovers the spool (messages left by a previous run or a killed
  worker) and starts the scheduler; :meth:`notify` asks for a new message to be delivered now.
- Each attempt groups the still-pending recipients by route (local Maildir, MX, smarthost,
  LMTP), delivers the groups concurrently, and records the result per recipient in the message's
  state file, so a restart never delivers twice to a recipient already done (except for the
  window between the next hop's 250 and the state write: a duplicate, never a loss).
- Temporary failures are retried with exponential backoff (``retry_initial`` × ``retry_factor``ⁿ,
  capped at ``retry_max``) until ``max_lifetime``; then the recipient expires and bounces.
- Permanent failures bounce at once: one DSN per attempt listing every failed recipient, to the
  envelope sender, never to the null sender. A delay warning goes out once after
  ``delay_warning``.
- Unexpected internal errors (bugs, unreadable files) are retried too, and after
  ``[queue] max_internal_errors`` the message moves to ``failed/`` for an operator.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import time
from dataclasses import dataclass

from ..config import parse_size
from ..queue.spool import Locked, MessageHandle, NotFound, Spool, SpoolError
from . import dsn as dsn_mod
from .client import Connection, ConnectError, ConnectionLost, ConnectionPool
from .local import LocalDeliveryError
from .routing import Route, RouteError, Router

log = logging.getLogger("filterd.delivery")

NUDGE_SOCKET = "delivery.sock"  # datagram socket in the spool directory


class RemoteNotify:
    """``notify(queue_id)`` for processes that enqueue but do not deliver (worker processes of
    ``filterd serve``): a datagram to the delivery process's socket in the spool directory.
    Best effort: if it is lost, the delivery process's once-a-second spool scan finds the
    message anyway."""

    def __init__(self, spool_dir):
        self.path = os.path.join(str(spool_dir), NUDGE_SOCKET)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def notify(self, queue_id: str) -> None:
        try:
            self.sock.sendto(queue_id.encode("ascii"), self.path)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@dataclass
class Result:
    kind: str  # ok | temp | perm
    response: str  # reply text as the next hop gave it, or our own explanation
    status: str = ""  # enhanced status code
    remote: str = ""  # next hop host name ("" for local)


def _status(kind: str, enhanced: str) -> str:
    if enhanced:
        return enhanced
    return {"ok": "2.0.0", "temp": "4.0.0", "perm": "5.0.0"}[kind]


class DeliveryCore:
    """Delivers what is in the spool. ``first_attempts_only``: the delivery core of a worker
    process of ``filterd serve``: it makes the first attempt for the messages its own process
    accepted (no re-reading by another process, no hand-over) and leaves everything else —
    retries, recovery, `filterd queue` actions — to the main process, which finds a deferred
    message in the spool by its once-a-second scan. The spool's per-message lock makes sure
    only one process attempts a message at a time."""

    def __init__(self, config, spool: Spool, services, pipeline=None,
                 first_attempts_only: bool = False):
        self.first_attempts_only = first_attempts_only
        self.config = config
        self.spool = spool
        self.services = services
        self.pipeline = pipeline
        d = config.get("delivery") or {}
        self.hostname = (config.get("server.hostname") or socket.getfqdn() or "localhost")
        self.helo = d.get("helo_name") or self.hostname
        self.max_concurrency = int(d.get("max_concurrency", 100))
        self.retry_initial = config.duration("delivery.retry_initial")
        self.retry_factor = float(d.get("retry_factor", 2.0))
        self.retry_max = config.duration("delivery.retry_max")
        self.max_lifetime = config.duration("delivery.max_lifetime")
        self.delay_warning = config.duration("delivery.delay_warning")
        self.connect_timeout = config.duration("delivery.connect_timeout")
        self.command_timeout = config.duration("delivery.command_timeout")
        self.data_timeout = config.duration("delivery.data_timeout")
        self.dead_host_time = config.duration("delivery.dead_host_time")
        self._dead: dict[tuple, tuple[float, str]] = {}  # destination -> (until, last error)
        self.tls = d.get("tls", "may")
        self.tls_verify = bool(d.get("tls_verify", False))
        self.tls_policy = {k.lower(): v for k, v in (d.get("tls_policy") or {}).items() if v}
        self.bounce_from = d.get("bounce_from", "MAILER-DAEMON")
        self.bounce_max_body = parse_size(d.get("bounce_max_body", "64K"))
        root = d.get("maildir_root") or ""
        self.maildir_root = root or str(config.state_dir / "mail")
        q = config.get("queue") or {}
        self.scan_interval = config.duration("queue.scan_interval") if q else 30.0
        self.max_internal_errors = int(q.get("max_internal_errors", 5))
        self.router = Router(config, lambda: services.dns)
        self.pool = ConnectionPool(int(d.get("max_per_destination", 20)),
                                   config.duration("delivery.connection_idle_timeout"),
                                   int(d.get("max_messages_per_connection", 1000)))
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._stopping = False
        self._last_flush = 0.0
        self._last_scan = 0.0
        self._nudge_sock: socket.socket | None = None
        self.stats = {"delivered": 0, "deferred": 0, "bounced": 0, "dsn_sent": 0}

    # -- public interface -------------------------------------------------------------------
    async def start(self) -> None:
        """Recover the spool, start the scheduler and the cross-process nudge socket."""
        self._wake = asyncio.Event()
        self._last_flush = self.spool.flush_mtime()
        if not self.first_attempts_only:
            await self._rescan()
            self._open_nudge_socket()
        self._runner = asyncio.create_task(self._run(), name="filterd-delivery")

    def _open_nudge_socket(self) -> None:
        path = str(self.spool.dir / NUDGE_SOCKET)
        try:
            if os.path.exists(path):
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setblocking(False)
        except OSError as exc:  # the 1-second spool scan still finds new messages
            log.warning("cannot bind %s (%s); messages from other processes are "
                        "found by the spool scan only", path, exc)
            return
        self._nudge_sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_nudge)

    def _on_nudge(self) -> None:
        assert self._nudge_sock is not None
        while True:
            try:
                msg = self._nudge_sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for qid in msg.decode("ascii", "replace").split():
                if qid not in self._inflight:
                    self._schedule(qid, 0.0)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop scheduling, let in-flight deliveries finish (at most ``timeout`` seconds; the
        rest are cancelled and stay in the spool), close idle connections."""
        self._stopping = True
        if self._wake:
            self._wake.set()
        if self._nudge_sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._nudge_sock.fileno())
            except (ValueError, OSError):
                pass
            self._nudge_sock.close()
            self._nudge_sock = None
        if self._runner:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        tasks = list(self._inflight.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.pool.close()

    def notify(self, queue_id: str) -> None:
        """A new message was enqueued: deliver soon."""
        self._schedule(queue_id, 0.0)

    @property
    def idle(self) -> bool:
        return not self._inflight and not any(t <= time.time() for t, _ in self._heap)

    # -- scheduling -------------------------------------------------------------------------
    def _schedule(self, qid: str, when: float) -> None:
        if self.first_attempts_only and when > time.time() + 0.5:
            return  # a retry: the main process's spool scan takes it over
        old = self._scheduled.get(qid)
        if old is not None and old <= when:
            return
        self._scheduled[qid] = when
        heapq.heappush(self._heap, (when, qid))
        if self._wake is not None:
            self._wake.set()

    def _light_scan(self) -> None:
        """Schedule messages that appeared in active/ (other processes, `queue release`)."""
        try:
            names = os.listdir(self.spool.dir / "active")
        except OSError:
            return
        for n in names:
            if "." not in n and n not in self._scheduled and n not in self._inflight:
                self._schedule(n, 0.0)

    async def _rescan(self) -> None:
        due = await asyncio.to_thread(self.spool.recover)
        for qid, when in due:
            if qid not in self._inflight and qid not in self._scheduled:
                self._schedule(qid, when)
        self._last_scan = time.monotonic()

    async def _run(self) -> None:
        assert self._wake is not None
        last_reap = time.monotonic()
        while not self._stopping:
            now = time.time()
            while self._heap and self._heap[0][0] <= now \
                    and len(self._inflight) < self.max_concurrency:
                when, qid = heapq.heappop(self._heap)
                if self._scheduled.get(qid) != when:
                    continue  # superseded by an earlier schedule
                del self._scheduled[qid]
                if qid in self._inflight:
                    continue  # the running attempt reschedules if needed
                task = asyncio.create_task(self._deliver_one(qid))
                self._inflight[qid] = task
                task.add_done_callback(lambda t, q=qid: self._done(q, t))
            wait = 1.0
            if self._heap and len(self._inflight) < self.max_concurrency:
                wait = max(0.0, min(wait, self._heap[0][0] - now))
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            mono = time.monotonic()
            if mono - last_reap >= 1.0:
                last_reap = mono
                await self.pool.reap()
                if self.first_attempts_only:
                    continue  # scans and `filterd queue` actions are the main process's
                flush = self.spool.flush_mtime()
                if flush != self._last_flush:  # `filterd queue flush|release|requeue`
                    self._last_flush = flush
                    for qid in list(self._scheduled):
                        self._schedule(qid, 0.0)  # not-due ones are re-timed from their state
                if mono - self._last_scan >= self.scan_interval:
                    try:  # full recovery scan: stale temp files, corrupt files
                        await self._rescan()
                    except OSError as exc:
                        log.error("cannot scan spool %s: %s", self.spool.dir, exc)
                self._light_scan()  # new files in active/ (other processes, release)

    def _done(self, qid: str, task: asyncio.Task) -> None:
        self._inflight.pop(qid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("attempt for %s crashed: %r", qid, task.exception())
        if self._wake is not None:
            self._wake.set()

    # -- one message ------------------------------------------------------------------------
    async def _deliver_one(self, qid: str, force: bool = False) -> None:
        try:
            h = self.spool.open(qid, "active")
        except (Locked, NotFound):
            return
        except SpoolError as exc:
            self.spool.mark_corrupt(qid, "active", str(exc))
            return
        closed = False
        try:
            if h.state.next_attempt > time.time() + 0.5 and not force:
                self._schedule(qid, h.state.next_attempt)  # not due (found by a scan)
                return
            try:
                finished = await self._attempt(h)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not lose the message
                log.exception("internal error delivering %s", qid)
                await self._internal_error(h, exc)
            else:
                if finished:
                    closed = True
                    if h.size < 1 << 20:
                        h.discard()  # a small file: unlinking it is quicker than a thread hop
                    else:
                        # freeing a big file's blocks is file system work that must not stall
                        # the event loop
                        await asyncio.get_running_loop().run_in_executor(None, h.discard)
        finally:
            if not closed:
                h.close()

    async def _internal_error(self, h: MessageHandle, exc: Exception) -> None:
        st = h.state
        st.internal_errors += 1
        now = time.time()
        if st.internal_errors >= self.max_internal_errors:
            log.error("%s failed %d times with internal errors (last: %r); moved to "
                      "%s/failed — inspect it, then `filterd queue requeue %s`", h.queue_id,
                      st.internal_errors, exc, self.spool.dir, h.queue_id)
            await asyncio.to_thread(self._save_and_move, h, "failed")
            return
        st.next_attempt = now + self._backoff(st.internal_errors)
        await asyncio.to_thread(h.save_state)
        self._schedule(h.queue_id, st.next_attempt)

    @staticmethod
    def _save_and_move(h: MessageHandle, area: str) -> None:
        h.save_state()
        h.move(area)

    def _backoff(self, attempts: int) -> float:
        return min(self.retry_initial * (self.retry_factor ** max(attempts - 1, 0)),
                   self.retry_max)

    async def _attempt(self, h: MessageHandle) -> bool:
        """One delivery attempt for every pending recipient; True when the message is finished
        (the caller removes it)."""
        env, st = h.envelope, h.state
        data = h.read_data()
        now = time.time()
        pending = [r for r in env.recipients if not (st.recipients.get(r) and
                                                     st.recipients[r].done)]
        results: dict[str, Result] = {}
        groups: dict[Route, list[str]] = {}
        for r in pending:
            try:
                groups.setdefault(self.router.route(r), []).append(r)
            except RouteError as exc:
                results[r] = Result("perm" if exc.permanent else "temp", str(exc), exc.status)
        outs = await asyncio.gather(*(self._deliver_route(route, h, rcpts, data)
                                      for route, rcpts in groups.items()))
        for o in outs:
            results.update(o)
        fin = time.time()
        st.attempts += 1
        st.last_attempt = now
        expired = now - (env.received_at or now) >= self.max_lifetime
        failed: list[dsn_mod.RecipientReport] = []
        for r, res in results.items():
            rs = st.rcpt(r)
            rs.attempts += 1
            rs.response = res.response
            rs.updated = now
            if res.kind == "ok":
                rs.status = "delivered"
                self.stats["delivered"] += 1
                log.info("%s to=<%s> relay=%s delay=%.2fs status=sent (%s)", h.queue_id, r,
                         res.remote or "local", fin - env.received_at, res.response)
            elif res.kind == "perm" or expired:
                rs.status = "failed" if res.kind == "perm" else "expired"
                why = res.response if res.kind == "perm" else \
                    f"delivery time expired; last error: {res.response}"
                status = res.status if res.kind == "perm" else "4.4.7"
                self.stats["bounced"] += 1
                log.warning("%s to=<%s> relay=%s delay=%.2fs status=bounced (%s)", h.queue_id, r,
                            res.remote or "none", fin - env.received_at, why)
                if dsn_mod.wants_notify(env, r, "FAILURE"):
                    # Diagnostic-Code carries only what a remote MTA said; our own explanation
                    # (routing errors, expiry) goes into the text part
                    failed.append(dsn_mod.RecipientReport(
                        r, "failed", status if status[:1] in ("4", "5") else "5.0.0",
                        diagnostic=res.response if res.remote else "", remote_mta=res.remote,
                        last_attempt=now, text=why))
            else:
                self.stats["deferred"] += 1
                log.info("%s to=<%s> relay=%s delay=%.2fs status=deferred (%s)", h.queue_id, r,
                         res.remote or "none", fin - env.received_at, res.response)
        # the bounce is durable before the state that says "failed" (a crash between the two
        # gives a duplicate bounce, never a lost one)
        if failed:
            await self._send_dsn(h, data, failed)
        still = [r for r in env.recipients if not st.rcpt(r).done]
        if still and not expired:
            if (self.delay_warning > 0 and not st.warned
                    and now - env.received_at >= self.delay_warning):
                delayed = []
                for r in still:
                    if not dsn_mod.wants_notify(env, r, "DELAY"):
                        continue
                    res = results.get(r)
                    delayed.append(dsn_mod.RecipientReport(
                        r, "delayed", res.status if res and res.status[:1] == "4" else "4.0.0",
                        diagnostic=res.response if res and res.remote else "",
                        remote_mta=res.remote if res else "", last_attempt=now,
                        will_retry_until=env.received_at + self.max_lifetime,
                        text=st.rcpt(r).response))
                if delayed:
                    await self._send_dsn(h, data, delayed)
                st.warned = True
            nxt = now + self._backoff(st.attempts)
            nxt = min(nxt, env.received_at + self.max_lifetime)
            st.next_attempt = max(nxt, now + 0.05)
            await asyncio.to_thread(h.save_state)
            self._schedule(h.queue_id, st.next_attempt)
        await self._events(h, data, results, expired)
        return not (still and not expired)

    async def _send_dsn(self, h: MessageHandle, data: bytes,
                        reports: list[dsn_mod.RecipientReport]) -> None:
        env = h.envelope
        if not env.mail_from:
            return  # never bounce a bounce
        msg = dsn_mod.build_dsn(env, data, reports, self.hostname, self.bounce_from,
                                self.bounce_max_body)
        qid = await self.spool.enqueue(dsn_mod.dsn_envelope(env), msg)
        self.stats["dsn_sent"] += 1
        log.info("%s: sent %s notification %s to <%s>", env.queue_id,
                 reports[0].action, qid, env.mail_from)
        self.notify(qid)

    async def _events(self, h: MessageHandle, data: bytes, results: dict[str, Result],
                      expired: bool) -> None:
        if self.pipeline is None or not results:
            return
        host = getattr(self.pipeline, "host", None)
        if host is not None and not host.impls("delivered") and not host.impls("bounced"):
            return  # nobody listens: skip building a context per message
        try:
            from ..model import Message, Recipient, Session

            env = h.envelope
            meta = env.meta or {}
            session = Session(peer_ip=meta.get("client_ip", "127.0.0.1") or "127.0.0.1",
                              helo=meta.get("helo", ""), auth_user=meta.get("auth_user", ""),
                              front_door="delivery")
            ctx = self.pipeline.begin(session)
            # the same id as at arrival, so the message trace joins the events
            ctx.transaction.id = meta.get("transaction") or ctx.transaction.id
            ctx.transaction.mail_from = env.mail_from
            ctx.transaction.recipients = [Recipient(r) for r in env.recipients]
            ctx.message = Message(data)
            ctx.data["queue_id"] = env.queue_id
            for r, res in results.items():
                if res.kind == "ok":
                    await self.pipeline.delivered(ctx, r, res.response)
                else:
                    await self.pipeline.bounced(ctx, r, res.response,
                                                permanent=res.kind == "perm" or expired)
        except Exception:  # noqa: BLE001 - events never affect delivery
            log.exception("pipeline event for %s failed", h.queue_id)

    # -- transports -------------------------------------------------------------------------
    async def _deliver_route(self, route: Route, h: MessageHandle, rcpts: list[str],
                             data: bytes) -> dict[str, Result]:
        if route.kind == "local":
            return await self._deliver_local(rcpts, data, h)
        try:
            hops = await self.router.next_hops(route)
        except RouteError as exc:
            kind = "perm" if exc.permanent else "temp"
            return {r: Result(kind, str(exc), exc.status) for r in rcpts}
        domain = rcpts[0].rpartition("@")[2].lower()
        policy = self._tls_for(domain, route)
        last = "no next hop"
        perm_greeting: Result | None = None
        for host, address in hops:
            key = (route.kind, address or route.unix_path, route.port, policy)
            dead = self._dead.get(key)
            if dead is not None:
                if dead[0] > time.monotonic():
                    last = f"{dead[1]} (not retried for {self.dead_host_time:.0f}s)"
                    continue
                del self._dead[key]
            try:
                return await self._send_via(key, route, host, address, policy, domain, h,
                                            rcpts, data)
            except ConnectError as exc:
                if self.dead_host_time > 0:  # spare the other queued messages the same wait
                    self._dead[key] = (time.monotonic() + self.dead_host_time, str(exc))
                last = str(exc)
                if exc.permanent and exc.reply is not None:
                    perm_greeting = Result("perm", str(exc.reply), exc.reply.enhanced or "5.0.0",
                                           host)
                log.info("%s: %s", h.queue_id, exc)
                continue
            except ConnectionLost as exc:
                last = str(exc)
                log.info("%s: %s", h.queue_id, exc)
                # the transaction may or may not have gone through: try again later (a possible
                # duplicate rather than a possible loss)
                return {r: Result("temp", f"{exc}", "4.4.2", host) for r in rcpts}
        if perm_greeting is not None and len(hops) == 1:
            return {r: perm_greeting for r in rcpts}
        status = "4.7.5" if "TLS" in last else "4.4.1"
        return {r: Result("temp", last, status) for r in rcpts}

    def _tls_for(self, domain: str, route: Route) -> str:
        if route.unix_path:
            return "none"
        for name in (domain, route.host):
            p = self.tls_policy.get(name)
            if p:
                return p
        parts = domain.split(".")
        for i in range(1, len(parts)):
            p = self.tls_policy.get("." + ".".join(parts[i:]))
            if p:
                return p
        return self.tls

    async def _send_via(self, key, route: Route, host: str, address: str, policy: str,
                        domain: str, h: MessageHandle, rcpts: list[str],
                        data: bytes) -> dict[str, Result]:
        env = h.envelope
        async with self.pool.limit(key):
            conn = self.pool.take_idle(key)
            reused = conn is not None
            for attempt in (1, 2):
                if conn is None:
                    conn = Connection(host, address, route.port, lmtp=route.kind == "lmtp",
                                      helo=self.helo, connect_timeout=self.connect_timeout,
                                      command_timeout=self.command_timeout,
                                      data_timeout=self.data_timeout,
                                      unix_path=route.unix_path)
                    try:
                        await conn.open(policy, self.tls_verify, domain)
                    except ConnectError as exc:
                        if policy == "may" and exc.reply is not None and \
                                exc.reply.lines == ["tls-failed"]:
                            conn = Connection(host, address, route.port,
                                              lmtp=route.kind == "lmtp", helo=self.helo,
                                              connect_timeout=self.connect_timeout,
                                              command_timeout=self.command_timeout,
                                              data_timeout=self.data_timeout)
                            await conn.open("none", False, domain)  # plain-text fallback
                        else:
                            raise
                    self.pool.opened += 1
                try:
                    replies = await conn.send(env.mail_from, rcpts, data, env.mail_params,
                                              env.rcpt_params)
                except ConnectionLost:
                    conn.close()
                    if reused and attempt == 1 and conn.tx_replies == 0:
                        # an idle connection the server closed meanwhile (nothing of this
                        # transaction was answered): one try on a fresh connection
                        conn, reused = None, False
                        continue
                    raise
                break
            self.pool.put(key, conn)
        out = {}
        for r, rep in replies.items():
            out[r] = Result(rep.kind, str(rep), _status(rep.kind, rep.enhanced), host)
        return out

    async def _deliver_local(self, rcpts: list[str], data: bytes,
                             h: MessageHandle) -> dict[str, Result]:
        from ..mailstore import MailStore, QuotaExceeded

        if getattr(self, "_mailstore", None) is None:
            self._mailstore = MailStore.from_config(self.config)
        out: dict[str, Result] = {}
        for r in rcpts:
            try:
                folder, path = await asyncio.to_thread(self._mailstore.deliver, r, data,
                                                       self.spool.fsync)
                out[r] = Result("ok", f"250 2.0.0 delivered to {folder} ({path})", "2.0.0")
            except QuotaExceeded as exc:
                code, enh = exc.smtp
                out[r] = Result("perm" if exc.permanent else "temp", f"{code} {enh} {exc}", enh)
            except LocalDeliveryError as exc:
                out[r] = Result("perm" if exc.permanent else "temp", str(exc),
                                "5.1.1" if exc.permanent else "4.2.0")
            except OSError as exc:
                out[r] = Result("temp", f"cannot write maildir for {r}: {exc}", "4.3.0")
        return out
