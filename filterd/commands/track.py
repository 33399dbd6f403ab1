"""``filterd track``: find messages in the message trace and show their whole journey."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..pipeline import load_config_and_plugins
from ..trace import TraceLog


def register(sub, common) -> None:
    p = sub.add_parser("track", parents=[common],
                       help="search the message trace: arrival, verdicts, deliveries, bounces")
    p.add_argument("--from", dest="sender", metavar="ADDR", help="envelope sender (or @domain)")
    p.add_argument("--to", dest="rcpt", metavar="ADDR", help="recipient (or @domain)")
    p.add_argument("--since", default="1d",
                   help="how far back: 30m, 2h, 1d, or an ISO date (default 1d)")
    p.add_argument("--until", default=None, help="end of the period (same forms)")
    p.add_argument("--id", dest="msg_id", help="filterd message ID (X-Filterd-ID)")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=run)


def parse_when(text: str | None, now: float) -> float | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip())
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * mult
    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text, fmt))
        except ValueError:
            continue
    raise SystemExit(f"filterd track: cannot read time {text!r}: use 30m, 2h, 1d or 2026-11-27")


def run(args) -> int:
    cfg, _ = load_config_and_plugins(args.config, args.overrides)
    directory = cfg.get("trace.directory") or str(Path(cfg.state_dir) / "trace")
    if not Path(directory, "index.sqlite").exists():
        print(f"filterd track: no message trace at {directory} yet", flush=True)
        return 1
    now = time.time()
    log = TraceLog(directory)
    try:
        found = log.search(args.sender, args.rcpt, parse_when(args.since, now),
                           parse_when(args.until, now), args.msg_id, args.limit)
    finally:
        log.close()
    for msg in found:
        if args.json:
            print(json.dumps(msg, ensure_ascii=False))
            continue
        print(f"message {msg['id']}")
        for e in msg["events"]:
            extra = ""
            d = e.get("detail") or {}
            if e["event"] == "arrival":
                extra = f" action={e.get('action')} score={e.get('score')} client={e.get('client')}"
                if d.get("subject"):
                    extra += f" subject={d['subject']!r}"
            elif d.get("response") or d.get("reason"):
                extra = f" {d.get('response') or d.get('reason')}"
            print(f"  {e['time']} {e['event']:<11} <{e.get('sender', '')}> -> "
                  f"<{e.get('rcpt', '')}>{extra}")
        print("  final: " + ", ".join(f"<{r}> {s}" for r, s in msg["state"].items()))
    if not found and not args.json:
        print("no matching messages")
    return 0 if found else 1
