"""``filterd check``: run a message through the full pipeline offline and show the outcome."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from ..model import Session
from ..pipeline import Pipeline
from ..verdict import Action

# Exit status per action: scripts can tell the outcome without parsing output.
EXIT_FOR_ACTION = {
    Action.ACCEPT: 0,
    Action.CONTINUE: 0,
    Action.ADD_HEADER: 3,
    Action.REWRITE_SUBJECT: 4,
    Action.QUARANTINE: 5,
    Action.DISCARD: 6,
    Action.TEMPFAIL: 7,
    Action.REJECT: 8,
}

EPILOG = """exit status: 0 accept (no action), 3 add_header, 4 rewrite_subject, 5 quarantine,
6 discard, 7 tempfail, 8 reject (the most severe action over all recipients);
1 runtime error, 2 usage or configuration error."""


def register(sub, common) -> None:
    p = sub.add_parser("check", parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="scan a message offline and print symbols, score and actions")
    p.add_argument("files", nargs="*", default=["-"], metavar="FILE",
                   help="message file(s) (default: stdin); with several files and --json, one "
                        "JSON object per line, each with a \"file\" key")
    p.add_argument("--from", dest="sender", default="", metavar="ADDR",
                   help="envelope sender (default: the null sender <>)")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                   help="envelope recipient (repeatable; default postmaster@localhost)")
    p.add_argument("--ip", default="127.0.0.1", help="client IP address (default 127.0.0.1)")
    p.add_argument("--helo", default="", help="HELO/EHLO name the client used")
    p.add_argument("--hostname", default="", help="client's reverse DNS name")
    p.add_argument("--auth-user", default="", help="treat the client as authenticated as USER")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", metavar="FILE",
                   help="also write the message as it would leave filterd (with modifications)")
    p.set_defaults(func=run)


def read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _usable_state_dir(args) -> list[str]:
    """An offline check by an ordinary user must not fail because the daemon's state directory
    (/var/lib/filterd) is not writable: then plugins keep their state in a private temp dir."""
    from ..config import load_raw

    raw = load_raw(args.config, args.overrides)
    state = (raw.data.get("server") or {}).get("state_dir") or "/var/lib/filterd"
    probe = state
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or "/"
    if os.access(probe, os.W_OK):
        return list(args.overrides)
    tmp = tempfile.mkdtemp(prefix="filterd-check-")
    print(f"filterd check: {state} is not writable; using {tmp} for plugin state",
          file=sys.stderr)
    return [*args.overrides, f"server.state_dir={tmp}"]


async def run(args) -> int:
    files = args.files or ["-"]
    pipe = await Pipeline.create(args.config, _usable_state_dir(args))
    worst = 0
    try:
        for path in files:
            try:
                raw = read_input(path)
            except OSError as exc:
                print(f"filterd check: cannot read {path}: {exc.strerror}", file=sys.stderr)
                worst = max(worst, 1) if worst in (0, 1) else worst
                continue
            session = Session(peer_ip=args.ip, helo=args.helo, peer_name=args.hostname,
                              auth_user=args.auth_user, front_door="check")
            result = await pipe.scan(raw, args.sender, args.rcpt, session)
            if args.output and len(files) == 1:
                with open(args.output, "wb") as f:
                    f.write(result.message_bytes())
            if args.json:
                d = result.to_dict()
                if len(files) > 1:
                    d = {"file": path, **d}
                print(json.dumps(d, ensure_ascii=False), flush=True)
            else:
                if len(files) > 1:
                    print(f"== {path}")
                print_human(result)
            worst = max(worst, EXIT_FOR_ACTION.get(result.action, 0))
    finally:
        await pipe.close()
    return worst


def print_human(result) -> None:
    d = result.to_dict()
    print(f"Action: {d['action']}")
    print(f"Score:  {d['score']:.2f}")
    print("Symbols:")
    if not d["symbols"]:
        print("  (none)")
    for s in d["symbols"]:
        opts = f" [{', '.join(s['options'])}]" if s.get("options") else ""
        desc = f"  {s['description']}" if s.get("description") else ""
        print(f"  {s['name']:<28} {s['score']:>8.2f}{opts}{desc}")
    for addr, syms in (d.get("recipient_symbols") or {}).items():
        print(f"Symbols for <{addr}> only:")
        for s in syms:
            print(f"  {s['name']:<28} {s['score']:>8.2f}")
    print("Recipients:")
    for addr, det in d["recipient_details"].items():
        why = f"  ({det['reason']})" if det.get("reason") else ""
        print(f"  <{addr}>: {det['action']} score={det['score']:.2f}{why}")
    if d["headers"]:
        print("Headers added:")
        for h in d["headers"]:
            print(f"  {h['name']}: {h['value']}")
    for m in d["modifications"]:
        print(f"Modification: {m['kind']} {m['name']} {m['value']}".rstrip())
    for e in d.get("errors", []):
        print(f"Error: {e}")
    if d.get("defects"):
        print("Message defects: " + ", ".join(d["defects"]))
