"""Helpers for testing filterd plugins (yours or third-party), shipped with filterd.

In a plugin's test suite::

    from filterd.testing import scan

    async def test_my_plugin_flags_lotteries(tmp_path):
        result = await scan(b"Subject: lottery\\r\\n\\r\\nyou won\\r\\n",
                            overrides=["plugins.site_dir=plugins"], state_dir=tmp_path)
        assert "SUBJ_LOTTERY" in symbol_names(result)

``scan`` builds a real pipeline (config defaults + overrides, no config file), runs the message
through every phase and closes the pipeline again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .model import Session
from .pipeline import Pipeline, ScanResult


async def scan(raw: bytes, sender: str = "sender@example.com",
               recipients: Iterable[str] = ("rcpt@example.org",), *,
               overrides: Iterable[str] = (), state_dir: str | Path | None = None,
               session: Session | None = None, resolver=None, store=None) -> ScanResult:
    ov = list(overrides)
    if state_dir is not None:
        ov.insert(0, f"server.state_dir={state_dir}")
    pipe = await Pipeline.create(None, ov, use_default_path=False, resolver=resolver, store=store)
    try:
        return await pipe.scan(raw, sender, list(recipients), session)
    finally:
        await pipe.close()


def symbol_names(result: ScanResult) -> list[str]:
    return [s.name for s in result.symbols]
