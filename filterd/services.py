"""Shared services handed to plugins: the config, the DNS resolver and the store.

Built once per pipeline; plugins reach them as ``services`` in ``startup`` and as
``ctx.services`` in every phase. Both the resolver and the store are created on first use, so
``filterd check`` on a plain message never opens a database or a socket it does not need.
"""
from __future__ import annotations

from typing import Any

from .config import Config


class Services:
    def __init__(self, config: Config, resolver=None, store=None):
        self.config = config
        self._resolver = resolver
        self._store = store
        self.extra: dict[str, Any] = {}  # named services added by subsystems (delivery, quarantine)

    @property
    def dns(self):
        if self._resolver is None:
            from . import dns

            self._resolver = dns.from_config(self.config)
        return self._resolver

    @property
    def store(self):
        if self._store is None:
            from .store import open_store

            self._store = open_store(self.config)
        return self._store

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
