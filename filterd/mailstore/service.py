"""The mailstore's background services inside ``filterd serve`` (or ``filterd pop3``): POP3
listeners and the Junk-folder scanner that trains the Bayesian filter."""
from __future__ import annotations

import asyncio
import logging

from ..config import parse_duration
from ..smtp.server import parse_hostport
from . import MailStore
from .junk import scan_all
from .pop3 import from_config as pop3_from_config

log = logging.getLogger("filterd.mailstore")


def learner(services):
    """A synchronous ``learn(kind, data)`` for the Junk scanner (it runs in a worker thread),
    or None when the Bayes plugin is off. Learning goes through the one learn path,
    :func:`filterd.bayes.learn_message`, like quarantine releases and training by email."""
    if not services.config.get("bayes.enabled", True):
        return None
    from ..bayes import learn_message

    loop = asyncio.get_running_loop()

    def sync_learn(kind: str, data: bytes) -> None:
        asyncio.run_coroutine_threadsafe(learn_message(services, data, kind == "spam"),
                                         loop).result(timeout=60)
    return sync_learn


async def junk_loop(store: MailStore, services, interval: float) -> None:
    while True:
        try:
            learned = await asyncio.to_thread(scan_all, store.root, learner(services))
            for md, kind, path in learned:
                log.info("junk training: learned %s as %s (%s)", path.name, kind, md)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep scanning next time
            log.exception("junk scan failed")
        await asyncio.sleep(interval)


async def start(pipeline) -> list:
    """Start what ``[pop3]``/``[mailstore]`` ask for; returns async closers."""
    cfg = pipeline.config
    store = MailStore.from_config(cfg)
    closers = []
    listen = cfg.get("pop3.listen") or []
    listen_tls = cfg.get("pop3.listen_tls") or []
    if listen or listen_tls:
        server = pop3_from_config(cfg, store)
        for spec, tls in [(s, False) for s in listen] + [(s, True) for s in listen_tls]:
            host, port = parse_hostport(spec)
            srv = await server.listen(host, port, implicit_tls=tls)
            sock = srv.sockets[0].getsockname()
            print(f"filterd: ready: pop3{'s' if tls else ''} on {sock[0]}:{sock[1]}",
                  flush=True, file=__import__("sys").stderr)
        closers.append(server.close)
    if cfg.get("delivery.local_domains"):
        task = asyncio.ensure_future(junk_loop(store, pipeline.services,
                                               parse_duration(cfg.get("mailstore.junk_scan_interval"))))

        async def stop_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        closers.append(stop_task)
    return closers
