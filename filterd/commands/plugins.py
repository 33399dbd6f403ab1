"""``filterd plugins``: what is loaded, from where, and which hooks each implements."""
from __future__ import annotations

import json

from ..pipeline import load_config_and_plugins
from ..plugin_host import PluginHost
from ..services import Services


def register(sub, common) -> None:
    p = sub.add_parser("plugins", parents=[common],
                       help="list plugins: origin, state, hooks implemented")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg, infos = load_config_and_plugins(args.config, args.overrides)
    host = PluginHost(cfg, infos, Services(cfg))
    rows = []
    for name in host.order + [i.name for i in infos if i.name not in host.order]:
        info = next(i for i in infos if i.name == name)
        state = "error" if info.error else ("enabled" if info.enabled else "disabled")
        rows.append({"name": name, "origin": info.origin, "state": state, "hooks": info.hooks,
                     "error": info.error, "description": info.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        hooks = ", ".join(r["hooks"]) or "-"
        print(f"{r['name']:<20} {r['state']:<9} {r['origin']:<28} hooks: {hooks}")
        if r["error"]:
            print(f"{'':<20} error: {r['error']}")
    return 1 if any(r["error"] for r in rows) else 0
