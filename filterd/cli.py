"""The ``filterd`` command. Every subcommand lives in its own module of
:mod:`filterd.commands` and registers itself there (``register(subparsers, common)``), so each
concern keeps its command next to its name. Every command accepts ``--config PATH`` and repeated
``--set section.key=value``.

Exit status: 0 success, 1 runtime error, 2 usage or configuration error; ``filterd check`` adds
codes for actions (see ``filterd check --help``).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import pkgutil
import sys

from . import __version__, commands
from .config import ConfigError
from .plugin_host import PluginError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", metavar="PATH",
                   help="main config file (default: $FILTERD_CONFIG or /etc/filterd/filterd.toml "
                        "if it exists, else built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    p.add_argument("--log-level", default=None, help="debug, info, warning or error")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="filterd", parents=[common],
        description="filterd mail gateway: SMTP gateway, before-queue proxy and milter "
                    "in front of one plugin pipeline.")
    parser.add_argument("--version", action="version", version=f"filterd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"filterd.commands.{mod.name}")
        module.register(sub, common)
    return parser


def setup_logging(level: str | None) -> None:
    logging.basicConfig(level=getattr(logging, (level or "warning").upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.log_level)
    try:
        rc = args.func(args)
        if asyncio.iscoroutine(rc):
            rc = asyncio.run(rc)
        return int(rc or 0)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except PluginError as exc:
        print(f"filterd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
