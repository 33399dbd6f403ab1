"""``filterd serve``: run the SMTP gateway (or the before-queue proxy).

    filterd serve                                    # everything from the config
    filterd serve --listen 127.0.0.1:10025 --relayhost 127.0.0.1:10026 --mynetworks 127.0.0.0/8
    filterd serve --mode proxy --listen 127.0.0.1:10025 --next-hop 127.0.0.1:10026

Flags override the config (they become ``--set`` overrides, so ``filterd config show`` style
checks apply to them too). Signals: SIGTERM/SIGINT stop accepting, let sessions finish (up to
``[smtp] shutdown_grace``), stop delivery and exit 0; SIGHUP reloads config, rules and plugins
without dropping connections (sessions in progress finish on the old pipeline).

When it is ready it prints one line per listener to stderr:
``filterd: ready: smtp on 127.0.0.1:2525`` (scripts and tests wait for it).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

from ..config import ConfigError, ConfigProblem

log = logging.getLogger("filterd.serve")


def register(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="run the SMTP gateway / before-queue proxy (see [smtp] in the config)")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                   help="inbound SMTP listener (repeatable or comma-separated; port 0 = any)")
    p.add_argument("--submission", action="append", default=[], metavar="HOST:PORT",
                   help="submission listener: AUTH after STARTTLS required (repeatable)")
    p.add_argument("--relayhost", metavar="HOST:PORT",
                   help="send all non-local mail to this smarthost ([delivery] relayhost)")
    p.add_argument("--mynetworks", metavar="CIDR[,CIDR]",
                   help="clients allowed to relay ([smtp] mynetworks)")
    p.add_argument("--spool", metavar="DIR", help="spool directory ([queue] directory)")
    p.add_argument("--mode", choices=("gateway", "proxy"), help="[smtp] mode")
    p.add_argument("--next-hop", metavar="HOST:PORT",
                   help="proxy mode: where to forward ([smtp] proxy_next_hop)")
    p.add_argument("--milter", metavar="SOCKET",
                   help="also (or only) serve as a milter: inet:PORT@HOST or unix:/path "
                        "([milter] listen); with no SMTP listener configured, milter only")
    p.add_argument("--workers", type=int, metavar="N",
                   help="SMTP worker processes sharing the listeners (0 = one per CPU)")
    p.set_defaults(func=run)


def _overrides(args) -> list[str]:
    ov = list(args.overrides)

    def split(values):
        out = []
        for v in values:
            out += [x.strip() for x in v.split(",") if x.strip()]
        return out

    if args.listen:
        ov.append("smtp.listen=" + json.dumps(split(args.listen)))
    if args.submission:
        ov.append("smtp.submission_listen=" + json.dumps(split(args.submission)))
    if args.relayhost:
        ov.append("delivery.relayhost=" + json.dumps(args.relayhost))
    if args.mynetworks:
        ov.append("smtp.mynetworks=" + json.dumps(split([args.mynetworks])))
    if args.spool:
        ov.append("queue.directory=" + json.dumps(os.path.abspath(args.spool)))
    if args.mode:
        ov.append("smtp.mode=" + json.dumps(args.mode))
    if args.next_hop:
        ov.append("smtp.proxy_next_hop=" + json.dumps(args.next_hop))
    if args.milter:
        ov.append("milter.listen=" + json.dumps(args.milter))
        if not args.listen and not args.submission:
            ov.append("smtp.listen=[]")  # `serve --milter X` alone: the milter front door only
    if args.workers is not None:
        ov.append(f"smtp.workers={int(args.workers)}")
    return ov


def _listener_specs(cfg):
    from ..smtp.server import ListenerSpec, parse_hostport

    specs = []
    mode = cfg.get("smtp.mode")
    for key, kind in (("smtp.listen", "proxy" if mode == "proxy" else "smtp"),
                      ("smtp.submission_listen", "submission")):
        val = cfg.get(key) or []
        if isinstance(val, str):
            val = [val] if val else []
        for item in val:
            try:
                host, port = parse_hostport(item)
            except ValueError as exc:
                raise ConfigError([ConfigProblem("", None, key, str(exc))])
            specs.append(ListenerSpec(host, port, kind))
    if not specs and not cfg.get("milter.listen"):
        raise ConfigError([ConfigProblem("", None, "smtp.listen",
                                         "no listener configured (set [smtp] listen, --listen "
                                         "or --milter)")])
    return specs


def _bind(specs, reuseport: bool):
    from ..smtp.server import make_socket

    for s in specs:
        try:
            s.sock = make_socket(s.host, s.port, reuseport=reuseport)
        except OSError as exc:
            raise ConfigError([ConfigProblem("", None, "smtp.listen",
                                             f"cannot listen on {s.host}:{s.port}: "
                                             f"{exc.strerror}")])
        s.port = s.sock.getsockname()[1]


def _raise_fd_limit(sessions: int) -> None:
    """Each session needs a socket (and, in proxy mode, a second one): raise the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = sessions * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
        if new < want:
            log.warning("open files limit %d is below what [smtp] max_sessions = %d needs (%d)",
                        new, sessions, want)


def run(args) -> int:
    """Synchronous entry: binds the listeners, forks workers if asked, then runs asyncio."""
    from ..pipeline import load_config_and_plugins

    overrides = _overrides(args)
    cfg, _ = load_config_and_plugins(args.config, overrides)
    if args.log_level is None:
        logging.getLogger().setLevel(getattr(logging, cfg.get("server.log_level").upper()))
    specs = _listener_specs(cfg)
    # check what the front door reads (TLS files, users file, networks) before saying "ready"
    from ..smtp.relay import RelayPolicy
    from ..smtp.server import Settings
    Settings.from_config(cfg)
    RelayPolicy.from_config(cfg)
    _raise_fd_limit(int(cfg.get("smtp.max_sessions")))
    workers = int(cfg.get("smtp.workers"))
    if workers == 0:
        workers = os.cpu_count() or 1
    _bind(specs, reuseport=False)
    switch = cfg.duration("server.switch_interval")
    if switch > 0:
        sys.setswitchinterval(switch)
    for s in specs:
        print(f"filterd: ready: {s.kind} on {s.host}:{s.port}", file=sys.stderr, flush=True)
    if workers <= 1:
        return asyncio.run(_main(args, overrides, specs, False))
    # pre-fork: children share the listening sockets and only accept + scan + spool; the parent
    # delivers. Children nudge the parent's delivery core through its datagram socket in the
    # spool directory (RemoteNotify); its spool scan is the fallback.
    children: dict[int, int] = {}

    def spawn(i: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = asyncio.run(_main(args, overrides, specs, True, worker=i))
            except BaseException as exc:  # noqa: BLE001 - say why before the quiet _exit
                if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    log.exception("worker %d failed", i)
            finally:
                logging.shutdown()
                os._exit(code or 0)
        return pid

    for i in range(workers):
        children[spawn(i)] = i
    for s in specs:
        s.sock.close()  # the parent does not accept
    return asyncio.run(_parent(args, overrides, children, spawn))


async def _build(args, overrides):
    from ..pipeline import Pipeline
    from ..smtp.relay import RelayPolicy
    from ..smtp.server import Settings

    pipe = await Pipeline.create(args.config, overrides)
    try:
        settings = Settings.from_config(pipe.config)
        relay = RelayPolicy.from_config(pipe.config)
    except Exception:
        await pipe.close()
        raise
    return pipe, settings, relay


def _open_spool(cfg):
    from ..queue.spool import Spool

    directory = cfg.path("queue.directory", "spool")
    return Spool(directory, fsync=bool(cfg.get("queue.fsync")))


async def _main(args, overrides, specs, is_worker: bool, worker: int | None = None) -> int:
    from ..smtp.backends import GatewayBackend, ProxyBackend
    from ..smtp.server import SMTPServer, parse_hostport

    pipe, settings, relay = await _build(args, overrides)
    cfg = pipe.config
    mode = cfg.get("smtp.mode")
    spool = _open_spool(cfg)
    delivery = None
    if is_worker and mode == "gateway" and cfg.get("queue.worker_delivery"):
        from ..delivery.core import DeliveryCore

        # first attempts for what this worker accepted; retries and scans: the main process
        delivery = DeliveryCore(cfg, spool, pipe.services, pipe, first_attempts_only=True)
        await delivery.start()
    elif is_worker:
        from ..delivery.core import RemoteNotify

        delivery = RemoteNotify(spool.dir)
    elif mode == "gateway":
        from ..delivery.core import DeliveryCore

        delivery = DeliveryCore(cfg, spool, pipe.services, pipe)
        await delivery.start()
    _register_submit(pipe, spool, delivery)
    side = [] if is_worker else await _start_side_services(pipe)
    next_hop = parse_hostport(cfg.get("smtp.proxy_next_hop"))
    proxy_timeout = cfg.duration("smtp.proxy_timeout")

    def factory(conn):
        if mode == "proxy":
            return ProxyBackend(conn, next_hop, proxy_timeout, spool)
        return GatewayBackend(conn, spool, delivery)

    if any(s.kind == "submission" for s in specs) and (settings.ssl_context is None or
                                                        settings.users is None):
        log.warning("submission listener without %s: no client can authenticate, so every MAIL "
                    "there gets 530 (set [smtp] tls_cert, tls_key and users_file)",
                    "a TLS certificate" if settings.ssl_context is None else "[smtp] users_file")
    server = SMTPServer(pipe, settings, relay, factory, mode=mode)
    await server.start(specs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def reload():
        nonlocal pipe
        log.info("SIGHUP: reloading configuration, rules and plugins")
        try:
            new_pipe, new_settings, new_relay = await _build(args, overrides)
        except Exception as exc:  # noqa: BLE001 - keep serving with the old config
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        _register_submit(new_pipe, spool, delivery)
        if cfg.get("milter.listen"):
            from ..milter.server import swap_pipeline as swap_milter

            swap_milter(new_pipe)
        pipe = new_pipe
        await server.swap_pipeline(new_pipe, new_settings, new_relay)
        log.info("reload done; sessions already running finish on the old configuration")

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    log.info("filterd %s ready (mode %s%s)", "worker %d" % worker if worker is not None else "",
             mode, f", spool {spool.dir}")
    await stop.wait()
    log.info("stopping: no new sessions; waiting for running ones")
    await server.stop(cfg.duration("smtp.shutdown_grace"))
    for close in side:
        await close()
    if delivery is not None:
        if hasattr(delivery, "stop"):
            await delivery.stop()
        else:
            delivery.close()
    await pipe.close()
    if server.keep_open is not pipe:
        await server.keep_open.close()
    try:
        spool.close()
    except Exception:  # noqa: BLE001
        pass
    log.info("stopped")
    return 0


def _register_submit(pipe, spool, delivery) -> None:
    """Mail filterd sends itself (list copies, confirmations, digests: filterd.mailer) goes
    through the same durable spool and delivery core as received mail."""
    from ..queue.spool import Envelope

    async def submit(sender, recipients, data, meta):
        env = Envelope(mail_from=sender, recipients=list(recipients), received_at=time.time(),
                       meta={"origin": "filterd", **(meta or {})})
        qid = await spool.enqueue(env, data)
        if delivery is not None:
            delivery.notify(qid)
        return qid

    pipe.services.extra["submit"] = submit


async def _start_side_services(pipe) -> list:
    """Services that run once per gateway (in the process that owns delivery), beside SMTP:
    the milter front door, the mailstore's POP3 listeners and Junk scanner. Returns async
    closers."""
    from ..mailstore import service as mailstore_service

    closers = await mailstore_service.start(pipe)
    if pipe.config.get("milter.listen"):
        from ..milter.server import run_milter_from_config

        task = asyncio.ensure_future(run_milter_from_config(pipe.config, pipe))

        async def stop_milter():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
        closers.append(stop_milter)
    return closers


async def _parent(args, overrides, children, spawn) -> int:
    """Multi-worker parent: runs the delivery core, restarts dead workers, forwards signals."""
    from ..delivery.core import DeliveryCore
    from ..pipeline import Pipeline

    pipe = await Pipeline.create(args.config, overrides)
    cfg = pipe.config
    spool = _open_spool(cfg)
    delivery = DeliveryCore(cfg, spool, pipe.services, pipe)
    await delivery.start()
    _register_submit(pipe, spool, delivery)
    side = await _start_side_services(pipe)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def hup():
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
    loop.add_signal_handler(signal.SIGHUP, hup)
    quick_deaths: list[float] = []
    exit_code = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done and not stop.is_set():
                i = children.pop(pid)
                now = time.monotonic()
                quick_deaths[:] = [t for t in quick_deaths if now - t < 30] + [now]
                if len(quick_deaths) > 5 * max(1, len(children) + 1):
                    log.error("workers keep dying (%d times in 30s, last: worker %d status %d); "
                              "giving up — see the errors above", len(quick_deaths), i, status)
                    exit_code = 1
                    stop.set()
                    break
                log.error("worker %d (pid %d) died (status %d); restarting", i, pid, status)
                time.sleep(0.2)
                children[spawn(i)] = i
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + cfg.duration("smtp.shutdown_grace") + 10
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                children.pop(pid, None)
        await asyncio.sleep(0.1)
    for close in side:
        await close()
    await delivery.stop()
    await pipe.close()
    return exit_code
