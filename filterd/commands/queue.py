"""``filterd queue``: look at and act on the spool (safe while ``filterd serve`` runs).

    filterd queue list [--area active|hold|failed|corrupt|all] [--json]
    filterd queue show ID [--data] [--json]
    filterd queue flush [ID...]            retry deferred messages now
    filterd queue delete ID... | --all     remove messages (no bounce)
    filterd queue hold ID... | --all       move to the hold area (not delivered)
    filterd queue release ID... | --all    move held messages back, deliver now
    filterd queue requeue ID... | --all    put failed (or held/active) messages back for delivery,
                                           internal error count and retry timer reset

A message being delivered at this moment is locked by the daemon: the command waits for it a
few seconds, then reports it as busy (exit status 1) and leaves it alone.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .. import config as config_mod
from ..queue.spool import AREAS, Locked, NotFound, Spool, SpoolError

ACTIONS = ("list", "show", "flush", "delete", "hold", "release", "requeue")


def register(sub, common) -> None:
    p = sub.add_parser("queue", parents=[common], help="list and manage the mail queue (spool)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("ids", nargs="*", metavar="ID", help="queue ids")
    p.add_argument("--all", action="store_true", help="every message the action applies to")
    p.add_argument("--area", default="", help="list: active, hold, failed, corrupt or all "
                                              "(default: active, hold and failed)")
    p.add_argument("--spool", metavar="DIR", help="spool directory (default: [queue] directory)")
    p.add_argument("--data", action="store_true", help="show: print the message itself")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--wait", type=float, default=5.0,
                   help="seconds to wait for a message that is being delivered (default 5)")
    p.set_defaults(func=run)


def spool_dir(cfg) -> Path:
    return cfg.path("queue.directory", "spool")


def run(args) -> int:
    cfg = config_mod.load(args.config, args.overrides)
    d = Path(args.spool) if args.spool else spool_dir(cfg)
    if not (d / "active").is_dir():
        print(f"filterd queue: no spool at {d} (set [queue] directory or use --spool DIR)",
              file=sys.stderr)
        return 1
    spool = Spool(d, fsync=bool(cfg.get("queue.fsync", True)))
    try:
        return ACTION_FUNCS[args.action](spool, args)
    finally:
        spool.close()


def _age(t: float) -> str:
    s = max(0, int(time.time() - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit}"
    return f"{s}s"


def do_list(spool: Spool, args) -> int:
    if args.area == "all":
        areas = AREAS
    elif args.area:
        if args.area not in AREAS:
            print(f"filterd queue: --area must be one of {', '.join(AREAS)}, all",
                  file=sys.stderr)
            return 2
        areas = (args.area,)
    else:
        areas = ("active", "hold", "failed")
    entries = spool.entries([a for a in areas if a != "corrupt"])
    corrupt = spool.ids("corrupt") if "corrupt" in areas else []
    if args.json:
        out = [e.to_json() for e in entries]
        out += [{"queue_id": q, "area": "corrupt"} for q in corrupt]
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if not entries and not corrupt:
        print("Mail queue is empty")
        return 0
    print(f"{'Queue ID':<20} {'Area':<7} {'Size':>8} {'Age':>5}  Sender / Recipients")
    for e in entries:
        sender = e.envelope.mail_from or "<>"
        print(f"{e.queue_id:<20} {e.area:<7} {e.size:>8} {_age(e.envelope.received_at):>5}  "
              f"{sender}")
        for r in e.envelope.recipients:
            st = e.state.recipients.get(r)
            status = st.status if st else "pending"
            why = f"  ({st.response})" if st and st.response and status != "delivered" else ""
            print(f"{'':<45}{r} [{status}]{why}")
        if e.state.attempts and e.area == "active":
            nxt = e.state.next_attempt - time.time()
            print(f"{'':<45}attempts={e.state.attempts} next in "
                  f"{max(0, int(nxt))}s")
    for q in corrupt:
        print(f"{q:<20} corrupt  (see {spool.dir / 'corrupt' / (q + '.reason')})")
    print(f"-- {len(entries) + len(corrupt)} message(s)")
    return 0


def _open(spool: Spool, qid: str, wait: float, area: str | None = None):
    deadline = time.monotonic() + wait
    while True:
        try:
            return spool.open(qid, area)
        except Locked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def do_show(spool: Spool, args) -> int:
    if len(args.ids) != 1:
        print("filterd queue show: give exactly one queue id", file=sys.stderr)
        return 2
    qid = args.ids[0]
    try:
        area = spool.find(qid)
        entry = next((e for e in spool.entries([area]) if e.queue_id == qid), None)
        if entry is None:
            raise SpoolError(f"{qid} cannot be read (moved meanwhile, or corrupt)")
        data = None
        if args.data:
            with open(spool.dir / area / qid, "rb") as f:
                from ..queue.spool import decode_header

                _, off, size = decode_header(spool.dir / area / qid, f)
                f.seek(off)
                data = f.read(size)
    except SpoolError as exc:
        print(f"filterd queue show: {exc}", file=sys.stderr)
        return 1
    if args.json:
        d = entry.to_json()
        d["envelope"] = entry.envelope.to_json()
        if data is not None:
            d["data"] = data.decode("utf-8", "replace")
        print(json.dumps(d, ensure_ascii=False))
        return 0
    e = entry
    print(f"Queue ID:  {e.queue_id}\nArea:      {e.area}\nSize:      {e.size}")
    print(f"Received:  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(e.envelope.received_at))}")
    print(f"Sender:    <{e.envelope.mail_from}>")
    for r in e.envelope.recipients:
        st = e.state.recipients.get(r)
        print(f"Recipient: <{r}> {st.status if st else 'pending'}"
              + (f" — {st.response}" if st and st.response else ""))
    print(f"Attempts:  {e.state.attempts}")
    if e.envelope.meta:
        print(f"Meta:      {json.dumps(e.envelope.meta, ensure_ascii=False)}")
    if data is not None:
        print()
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    return 0


def _targets(spool: Spool, args, areas: tuple[str, ...]) -> list[tuple[str, str]] | None:
    if args.all:
        return [(q, a) for a in areas for q in spool.ids(a)]
    if not args.ids:
        print(f"filterd queue {args.action}: give queue ids or --all", file=sys.stderr)
        return None
    out = []
    for q in args.ids:
        try:
            out.append((q, spool.find(q)))
        except NotFound:
            out.append((q, ""))
    return out


def _apply(spool: Spool, args, areas: tuple[str, ...], fn, verb: str) -> int:
    targets = _targets(spool, args, areas)
    if targets is None:
        return 2
    rc = 0
    results = []
    for qid, area in targets:
        if not area:
            results.append({"queue_id": qid, "ok": False, "error": "not in the queue"})
            rc = 1
            continue
        if area not in areas:
            results.append({"queue_id": qid, "ok": False,
                            "error": f"is in {area}/, {verb} applies to {', '.join(areas)}"})
            rc = 1
            continue
        try:
            with _open(spool, qid, args.wait, area) as h:
                fn(h)
            results.append({"queue_id": qid, "ok": True})
        except Locked:
            results.append({"queue_id": qid, "ok": False,
                            "error": "being delivered right now; try again"})
            rc = 1
        except NotFound:
            results.append({"queue_id": qid, "ok": False, "error": "gone (delivered meanwhile?)"})
            rc = 1
        except SpoolError as exc:
            results.append({"queue_id": qid, "ok": False, "error": str(exc)})
            rc = 1
    if verb in ("flushed", "released", "requeued"):
        spool.touch_flush()
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{r['queue_id']}: {verb}" if r["ok"] else f"{r['queue_id']}: {r['error']}",
                  file=sys.stdout if r["ok"] else sys.stderr)
        if args.all and not results:
            print(f"no messages to act on in {', '.join(areas)}")
    return rc


def _reset_timer(h) -> None:
    h.state.next_attempt = 0.0
    h.save_state()


def do_flush(spool: Spool, args) -> int:
    if not args.ids:
        args.all = True
    return _apply(spool, args, ("active",), _reset_timer, "flushed")


def do_delete(spool: Spool, args) -> int:
    return _apply(spool, args, ("active", "hold", "failed"), lambda h: h.remove(), "deleted")


def do_hold(spool: Spool, args) -> int:
    return _apply(spool, args, ("active",), lambda h: h.move("hold"), "held")


def do_release(spool: Spool, args) -> int:
    def release(h):
        h.state.next_attempt = 0.0
        h.save_state()
        h.move("active")
    return _apply(spool, args, ("hold",), release, "released")


def do_requeue(spool: Spool, args) -> int:
    def requeue(h):
        h.state.next_attempt = 0.0
        h.state.internal_errors = 0
        h.save_state()
        h.move("active")
    areas = ("failed",) if args.all else ("failed", "hold", "active")
    return _apply(spool, args, areas, requeue, "requeued")


ACTION_FUNCS = {"list": do_list, "show": do_show, "flush": do_flush, "delete": do_delete,
                "hold": do_hold, "release": do_release, "requeue": do_requeue}
