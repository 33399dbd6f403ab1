"""``filterd quarantine``: list, show, release, delete, purge held messages; send digests;
run the quarantine web pages on their own."""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import time


def register(sub, common) -> None:
    p = sub.add_parser("quarantine", parents=[common],
                       help="held messages: list, show, release, delete, purge, report, web")
    qs = p.add_subparsers(dest="qcommand", metavar="ACTION")
    ls = qs.add_parser("list", parents=[common], help="list held entries")
    ls.add_argument("--rcpt", help="only entries held for this recipient")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    show = qs.add_parser("show", parents=[common], help="show an entry and its message")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print only the message bytes")
    for name, what in (("release", "deliver held entries to their recipients"),
                       ("delete", "delete held entries")):
        a = qs.add_parser(name, parents=[common], help=what)
        a.add_argument("ids", nargs="+", metavar="ID")
    rep = qs.add_parser("report", parents=[common],
                        help="build the digests that are due (print them; --send mails them)")
    rep.add_argument("--send", action="store_true", help="mail the digests (else: dry run)")
    rep.add_argument("--force", action="store_true",
                     help="ignore each user's frequency (still only new entries)")
    rep.add_argument("--rcpt", action="append", default=[], help="only this recipient")
    rep.add_argument("--html", action="store_true", help="print the HTML part (dry run)")
    qs.add_parser("purge", parents=[common], help="remove entries past [quarantine] retention")
    web = qs.add_parser("web", parents=[common], help="serve the quarantine web pages")
    web.add_argument("--listen", help="ADDRESS:PORT (default: [quarantine] web_listen)")
    p.set_defaults(func=run, qparser=p)


async def _service(args):
    from ..pipeline import load_config_and_plugins
    from ..quarantine import QuarantineService
    from ..services import Services

    config, _ = load_config_and_plugins(args.config, args.overrides)
    services = Services(config)
    return QuarantineService(config, services), services


def _line(e) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.received_at))
    return (f"{e.id}  {when}  {e.score:6.1f}  {e.recipient:<28} {e.sender or '<>':<28} "
            f"{e.subject[:60]}")


async def run(args) -> int:
    if not getattr(args, "qcommand", None):
        args.qparser.print_help()
        return 2
    from ..quarantine import ActionError

    service, services = await _service(args)
    try:
        q = service.qstore
        if args.qcommand == "list":
            entries = await (q.entries_for(args.rcpt) if args.rcpt else q.all_entries())
            for e in entries:
                print(json.dumps(e.to_dict()) if args.json else _line(e))
            return 0
        if args.qcommand == "show":
            e = await q.get(args.id)
            if e is None:
                print(f"filterd quarantine: no entry {args.id}", file=sys.stderr)
                return 1
            data = await q.read_message(e)
            if args.raw:
                sys.stdout.buffer.write(data)
                return 0
            for k, v in e.to_dict().items():
                print(f"{k + ':':<14}{v}")
            print()
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            return 0
        if args.qcommand in ("release", "delete"):
            rc = 0
            for i in args.ids:
                e = await q.get(i)
                if e is None or e.status != "held":
                    print(f"filterd quarantine: no held entry {i}", file=sys.stderr)
                    rc = 1
                    continue
                try:
                    if args.qcommand == "release":
                        await service.release(e)
                    else:
                        await service.delete(e)
                except ActionError as exc:
                    print(f"filterd quarantine: {i}: {exc}", file=sys.stderr)
                    rc = 1
                    continue
                print(f"{i} {args.qcommand}d ({e.recipient})")
            return rc
        if args.qcommand == "purge":
            print(f"{await q.purge()} entries purged")
            return 0
        if args.qcommand == "report":
            from ..reports.digest import run_reports

            digests = await run_reports(service, send=args.send, force=args.force,
                                        recipients=args.rcpt or None)
            for d in digests:
                if args.send:
                    print(f"sent {'admin summary' if d.admin else 'digest'} to {d.to} "
                          f"({len(d.entries)} entries)")
                else:
                    print(f"To: {d.to}\nSubject: {d.subject}\n\n{d.html if args.html else d.text}")
            if args.send:
                await q.purge()
            return 0
        if args.qcommand == "web":
            from ..web import QuarantineWeb

            listen = args.listen or service.options.get("web_listen") or "127.0.0.1:8025"
            web = QuarantineWeb(service)
            port = await web.start(listen)
            print(f"serving quarantine pages on {listen.rpartition(':')[0]}:{port}", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, stop.set)
            await stop.wait()
            await web.stop()
            return 0
    finally:
        await services.close()
    return 2
