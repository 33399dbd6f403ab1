"""Subcommands of ``filterd``: one module each, with ``register(subparsers, common)`` adding the
command and setting ``func`` (sync, or async: the CLI runs it with ``asyncio.run``)."""
