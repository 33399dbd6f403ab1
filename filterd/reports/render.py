"""The one jinja2 environment for mail and web templates.

Sandboxed (a site template cannot reach Python internals) and autoescaped for ``*.html.j2``:
a subject like ``<script>`` is shown as text everywhere. Plain-text templates are not escaped
(they are sent as text/plain). Site templates in ``[quarantine.digest] template_dir`` come first.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

HERE = Path(__file__).resolve().parent


def _autoescape(name: str | None) -> bool:
    return bool(name) and (name.endswith(".html.j2") or name.endswith(".html"))


def _datetime(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def make_env(cfg=None) -> SandboxedEnvironment:
    dirs = []
    site = cfg.get("quarantine.digest.template_dir") if cfg is not None else ""
    if site:
        dirs.append(str(site))
    dirs += [str(HERE / "templates"), str(HERE.parent / "web" / "templates")]
    env = SandboxedEnvironment(loader=jinja2.FileSystemLoader(dirs), autoescape=_autoescape,
                               undefined=jinja2.StrictUndefined, trim_blocks=True,
                               lstrip_blocks=True)
    env.filters["datetime"] = _datetime
    return env
