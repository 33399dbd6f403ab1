"""Which event loop runs filterd's milter ([milter] event_loop; the native engine).

uvloop (libuv, written in C) runs the same asyncio programs with the loop, its transports and
its timers compiled: the per-connection and per-packet work that asyncio's own loop does in
Python. A milter behind Postfix opens a connection per SMTP session and reads many small
packets, so that work is a fixed share of every message: uvloop cut filterd's milter from 3.69
to 3.38 M instructions per message (bench/cost.py milter, 2026-11-28). asyncio's own loop
stays available ("asyncio") and is used when uvloop is not installed ("auto").

The SMTP gateway stays on asyncio's own loop: aiosmtpd implements STARTTLS by swapping the
protocol under an asyncio transport, which uvloop's transports do not support (the handshake
never completes).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .config import ConfigError, ConfigProblem

log = logging.getLogger("filterd")

CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(setting: str) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(name of the loop, factory for asyncio.Runner; None = asyncio's own)."""
    setting = (setting or "auto").lower()
    if setting not in CHOICES:
        raise _problem(f"expected one of {', '.join(CHOICES)}, got {setting!r}")
    if setting == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError as exc:
        if setting == "uvloop":
            raise _problem(f"\"uvloop\" but uvloop cannot be imported ({exc}); install it "
                           "(pip install uvloop) or set event_loop = \"auto\"") from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def _problem(what: str) -> ConfigError:
    return ConfigError([ConfigProblem("config", None, "milter.event_loop", what)])


def run(coro: Coroutine[Any, Any, Any], setting: str = "auto") -> Any:
    """asyncio.run(coro) on the loop ``setting`` names."""
    name, factory = loop_factory(setting)
    log.debug("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)
