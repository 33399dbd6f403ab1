"""``filterd config check|example|show``."""
from __future__ import annotations

import json
import sys

from .. import config as config_mod
from ..pipeline import load_config_and_plugins
from ..rules import load_rules


def register(sub, common) -> None:
    p = sub.add_parser("config", parents=[common], help="check or print the configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    c = csub.add_parser("check", parents=[common],
                        help="check config, conf.d, rules and plugins; report every problem")
    c.set_defaults(func=check)
    e = csub.add_parser("example", parents=[common],
                        help="print the annotated example config (every setting and its default)")
    e.set_defaults(func=example)
    s = csub.add_parser("show", parents=[common], help="print the effective config as JSON")
    s.set_defaults(func=show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def check(args) -> int:
    problems = []
    try:
        cfg, infos = load_config_and_plugins(args.config, args.overrides)
    except config_mod.ConfigError as exc:
        problems.extend(exc.problems)
        cfg, infos = None, []
    for info in infos:
        if info.error:
            problems.append(config_mod.ConfigProblem(info.origin, None, f"plugins.{info.name}",
                                                     info.error))
    if cfg is not None:
        _, rule_problems = load_rules(cfg, strict=False)
        problems.extend(rule_problems)
    for p in problems:
        print(f"config error: {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 2
    where = cfg.raw.main_path or "built-in defaults"
    print(f"configuration OK ({where}; {sum(1 for i in infos if not i.error)} plugins)")
    return 0


def example(args) -> int:
    _, infos = load_config_and_plugins(None, [], use_default_path=False)
    schema = config_mod.core_schema()
    for i in infos:
        if not i.error:
            schema.add_text(f"plugin {i.name}", i.config_text, section=i.name)
    sys.stdout.write(schema.example())
    return 0


def show(args) -> int:
    cfg, _ = load_config_and_plugins(args.config, args.overrides)
    print(json.dumps(cfg.data, indent=2, sort_keys=True))
    return 0
