"""``filterd pop3`` (run the POP3 server alone) and ``filterd mailstore`` (mailbox tools)."""
from __future__ import annotations

import asyncio
import signal

from ..pipeline import Pipeline, load_config_and_plugins


def register(sub, common) -> None:
    p = sub.add_parser("pop3", parents=[common],
                       help="run the POP3 server (and the Junk scanner) without the SMTP gateway")
    p.add_argument("--listen", action="append", default=[], metavar="HOST:PORT")
    p.set_defaults(func=run_pop3)
    m = sub.add_parser("mailstore", parents=[common], help="mailbox tools")
    msub = m.add_subparsers(dest="mailstore_command", metavar="ACTION")
    j = msub.add_parser("learn-junk", parents=[common],
                        help="scan every mailbox now: train Bayes on moves into/out of Junk")
    j.set_defaults(func=learn_junk)
    u = msub.add_parser("usage", parents=[common], help="a user's mailbox size and quota")
    u.add_argument("user")
    u.set_defaults(func=usage)
    m.set_defaults(func=lambda a: (m.print_help(), 2)[1])


async def run_pop3(args) -> int:
    from ..mailstore import service

    overrides = list(args.overrides)
    if args.listen:
        import json
        overrides.append("pop3.listen=" + json.dumps(args.listen))
    pipe = await Pipeline.create(args.config, overrides)
    closers = await service.start(pipe)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for c in closers:
        await c()
    await pipe.close()
    return 0


async def learn_junk(args) -> int:
    from ..mailstore import MailStore
    from ..mailstore.junk import scan_all
    from ..mailstore.service import learner

    pipe = await Pipeline.create(args.config, args.overrides)
    try:
        store = MailStore.from_config(pipe.config)
        learn = learner(pipe.services)
        if learn is None:
            print("filterd mailstore: no Bayes learner is enabled; moves are recorded only")
        found = await asyncio.to_thread(scan_all, store.root, learn)
        for md, kind, path in found:
            print(f"learned {kind}: {path}")
        print(f"{len(found)} message(s) learned")
    finally:
        await pipe.close()
    return 0


def usage(args) -> int:
    from ..mailstore import MailStore

    cfg, _ = load_config_and_plugins(args.config, args.overrides)
    store = MailStore.from_config(cfg)
    used = store.usage(args.user, fresh=True)
    quota = store.policy(args.user).quota
    print(f"{args.user}: {used} bytes used of {quota or 'unlimited'}"
          f"{' bytes' if quota else ''} ({store.maildir(args.user)})")
    return 0
