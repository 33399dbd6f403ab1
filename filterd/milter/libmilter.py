"""The pymilter engine (``[milter] engine = "pymilter"``): Sendmail's libmilter in front of the
asynchronous pipeline.

Threads: libmilter runs one thread per MTA connection and calls our callbacks there. The pipeline
is asynchronous and its services (DNS, Redis, SQLite) belong to one event loop, so each milter
process runs exactly one asyncio loop in a background thread and the callbacks hand it whole
coroutines with :func:`asyncio.run_coroutine_threadsafe`, blocking their own (GIL-free) wait.
What the callbacks do is :class:`filterd.milter.server.MilterSession`, shared with the native
engine; this module is only the libmilter side of it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import Milter
import milter

from ..verdict import Action
from . import actions as milter_actions
from . import server as core
from .server import WANTED_ACTIONS, MilterServer, MilterSession, MilterSettings

log = logging.getLogger("filterd.milter")

SMFI_CODE = {"continue": milter.CONTINUE, "reject": milter.REJECT,
             "tempfail": milter.TEMPFAIL, "discard": milter.DISCARD, "accept": milter.ACCEPT}


class LoopThread:
    """One asyncio event loop in a daemon thread; ``run(coro, timeout)`` from any other thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.own = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self.thread: threading.Thread | None = None

    def start(self) -> "LoopThread":
        if self.own:
            self.thread = threading.Thread(target=self._run, name="filterd-milter-loop",
                                           daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None):
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.own and self.thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


class FilterdMilter(MilterSession, Milter.Base):
    """One MTA connection. Callbacks run in that connection's libmilter thread."""

    # -- engine --------------------------------------------------------------------------------
    def _macro(self, name: str) -> str:
        try:
            v = self._ctx.getsymval(name)
        except Exception:  # noqa: BLE001
            return ""
        return v or ""

    def _noreply(self) -> int:
        return milter.NOREPLY

    def _continue(self) -> int:
        return milter.CONTINUE

    def _early(self, coro, store: bool) -> int:
        srv = self.server
        try:
            v = srv.loop.run(coro, srv.settings.timeout)
        except Exception as exc:  # noqa: BLE001
            log.exception("milter early phase failed")
            return self._error(f"{type(exc).__name__}: {exc}")
        reply = self._early_refusal(v, store)
        if reply is None:
            return milter.CONTINUE
        code, enh, text = reply
        self._ctx.setreply(str(code), enh, text)
        return milter.REJECT if v.action is Action.REJECT else milter.TEMPFAIL

    def _reply_error(self, policy: str, reply) -> int:
        if reply is not None:
            code, enh, text = reply
            try:
                self._ctx.setreply(str(code), enh, text)
            except Exception:  # noqa: BLE001
                pass
        return SMFI_CODE[policy]

    # -- libmilter callbacks that differ from the shared ones ----------------------------------
    def negotiate(self, opts):
        actions, proto, symlist = self.choose(opts[0], opts[1])
        if symlist:
            for stage, macros in core.REQUESTED_MACROS.items():
                try:
                    self._ctx.setsymlist(stage, macros)
                except Exception:  # noqa: BLE001 - an MTA that refuses keeps its own lists
                    log.debug("MTA refused macro list for stage %s", stage)
        opts[0], opts[1], opts[2], opts[3] = actions, proto, 0, 0
        return milter.CONTINUE

    def connect_libmilter(self, hostname, family, hostaddr):
        if isinstance(hostaddr, tuple) and hostaddr:
            return self.connect(hostname, str(hostaddr[0]),
                                int(hostaddr[1]) if len(hostaddr) > 1 else 0)
        return self.connect(hostname, None, 0)

    def eom(self):
        srv = self.server
        s = srv.settings
        t0 = time.monotonic()
        try:
            if self.failure:
                return self._error(self.failure)
            queue_id, raw, headers = self.eom_input()
            p, result = srv.loop.run(
                srv.end_of_message(self.pipeline, self.tx, self.session, raw, headers,
                                   self.truncated), s.timeout)
            rc = self._apply(p)
            try:  # bookkeeping only: the answer is rc whatever happens here
                after = self.eom_done(p, result, queue_id, t0)
                if after is not None:
                    srv.loop.submit(after)
            except Exception:  # noqa: BLE001
                log.exception("milter: bookkeeping after end of message failed")
            return rc
        except FutureTimeout:
            return self._error(f"pipeline did not finish within [milter] timeout "
                               f"{s.timeout:g}s")
        except Exception as exc:  # noqa: BLE001 - never crash the milter thread
            log.exception("milter end of message failed")
            return self._error(f"{type(exc).__name__}: {exc}")
        finally:
            self._reset()

    def close(self):
        self._reset()
        return milter.CONTINUE

    def _apply(self, p: milter_actions.MilterPlan) -> int:
        ctx = self._ctx
        if p.result in ("reject", "tempfail"):
            if p.reply:
                code, enh, text = p.reply
                ctx.setreply(str(code), enh, text)
            return SMFI_CODE[p.result]
        if p.result == "discard":
            return milter.DISCARD
        for op, *args in self.operations(p, self.tx):
            if op == "delrcpt":
                ctx.delrcpt(args[0])
            elif op == "chgheader":
                ctx.chgheader(*args)
            elif op == "insheader":
                ctx.addheader(args[0], args[1], 0)
            elif op == "addheader":
                ctx.addheader(args[0], args[1], -1)
            elif op == "replbody":
                ctx.replacebody(args[0])
            elif op == "quarantine":
                ctx.quarantine(args[0])
        return milter.CONTINUE


# -- registration with libmilter ----------------------------------------------------------------
def _negotiate(ctx, opts):
    m = FilterdMilter(core._SERVER)
    m._setctx(ctx)
    return m.negotiate(opts)


def _connect(ctx, hostname, family, hostaddr):
    m = ctx.getpriv()
    if m is None:  # MTA without negotiation (milter protocol 2)
        m = FilterdMilter(core._SERVER)
        m._setctx(ctx)
    return m.connect_libmilter(hostname, family, hostaddr)


def _close(ctx):
    m = ctx.getpriv()
    if m is None:
        return milter.CONTINUE
    try:
        return m.close()
    finally:
        m._setctx(None)


def register(s: MilterSettings) -> None:
    """Install the callbacks with libmilter (before opening the socket and forking workers).
    The per-process :class:`MilterServer` is ``server._SERVER``, set before ``milter.main()``."""
    milter.set_connect_callback(_connect)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(_close)
    policy = {"tempfail": milter.TEMPFAIL, "reject": milter.REJECT,
              "accept": milter.CONTINUE}[s.on_error]
    milter.set_exception_policy(policy)
    milter.setconn(s.listen)
    milter.settimeout(int(s.io_timeout))
    milter.setbacklog(s.backlog)
    milter.set_flags(WANTED_ACTIONS | milter.SETSYMLIST)
    milter.register(s.name, negotiate=_negotiate)


def open_socket(settings: MilterSettings) -> None:
    try:
        milter.opensocket(True)
    except milter.error as exc:
        raise OSError(f"milter: cannot listen on {settings.listen!r} ([milter] listen): {exc}; "
                      "is another process using it?") from exc
    if settings.listen.startswith(("unix:", "local:")):
        path = settings.listen.split(":", 1)[1]
        try:
            os.chmod(path, settings.socket_mode)
        except OSError as exc:
            log.warning("milter: cannot chmod %s: %s", path, exc)
    else:
        set_nodelay(settings.listen)


def set_nodelay(spec: str) -> None:
    """TCP_NODELAY on libmilter's listening socket (Linux hands it on to every accepted
    connection). libmilter never sets it, and at end of message a milter writes several small
    packets in a row (header changes, then the reply): with Nagle's algorithm each one after the
    first waits for the MTA's delayed ACK, up to 40 ms per message. libmilter does not expose the
    socket, so it is found among our descriptors by its listening port (``spec`` is
    ``inet:PORT@HOST``; bench/milter_bench.py's null milter uses it too)."""
    import socket as so

    port = int(spec.split(":", 1)[1].split("@", 1)[0])
    for fd in sorted(int(x) for x in os.listdir("/proc/self/fd")) if os.path.isdir(
            "/proc/self/fd") else range(3, 256):
        try:
            s = so.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == so.SOCK_STREAM and s.family in (so.AF_INET, so.AF_INET6) and \
                    s.getsockname()[1] == port and s.getsockopt(so.SOL_SOCKET, so.SO_ACCEPTCONN):
                s.setsockopt(so.IPPROTO_TCP, so.TCP_NODELAY, 1)
                return
        except OSError:
            pass
        finally:
            s.close()
    log.warning("milter: listening socket for %s not found; TCP_NODELAY not set (replies to the "
                "MTA may wait for delayed ACKs)", spec)


# -- running ------------------------------------------------------------------------------------
def serve_one(settings: MilterSettings, config_path, overrides, use_default_path: bool) -> int:
    """One milter process: own loop thread and pipeline, libmilter's main loop in this thread."""
    from ..pipeline import Pipeline

    if settings.switch_interval > 0:
        sys.setswitchinterval(settings.switch_interval)
    loop = LoopThread().start()
    try:
        pipeline = loop.run(Pipeline.create(config_path, overrides, use_default_path))
    except Exception:
        loop.stop()
        raise
    server = core._SERVER = MilterServer(settings, pipeline, loop)
    log.info("milter pid %d ready on %s (pymilter engine; early phases waiting for plugins: "
             "%s)", os.getpid(), settings.listen,
             ",".join(h for h, v in server.live.items() if v) or "none")
    try:
        rc = milter.main()
    finally:
        try:
            loop.run(pipeline.close(), 30)
        except Exception:  # noqa: BLE001
            log.exception("pipeline shutdown failed")
        loop.stop()
    return 0 if rc in (None, 0) else 1


async def serve_in_loop(server: MilterServer) -> None:
    """libmilter for ``filterd serve``: ``server`` (whose loop thread wraps the running loop)
    is ``server._SERVER``; runs until cancelled or until libmilter stops."""
    settings = server.settings
    register(settings)
    open_socket(settings)
    print(f"filterd: ready: milter on {settings.listen}", file=sys.stderr, flush=True)
    done = asyncio.get_running_loop().run_in_executor(None, milter.main)
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        milter.stop()
        await done
        raise
    finally:
        core._remove_socket(settings)
