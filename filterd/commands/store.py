"""``filterd store``: is the shared store reachable from this node, and what does it know about
a client or sender domain (reputation, greylist auto-allow)."""
from __future__ import annotations

import json
import time

from ..pipeline import load_config_and_plugins
from ..reputation import ReputationModel, client_network
from ..store import StoreError


def register(sub, common) -> None:
    p = sub.add_parser("store", parents=[common],
                       help="shared store: check the connection, show reputation standings")
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    s = ssub.add_parser("ping", parents=[common],
                        help="connect to the configured store (Redis/SQLite) and time a PING")
    s.set_defaults(func=ping)
    s = ssub.add_parser("show", parents=[common],
                        help="reputation of an IP address (and its network) or a sender domain")
    s.add_argument("subject", help="IP address, or sender domain / address")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=show)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _open(args):
    from ..store import open_store

    cfg, _ = load_config_and_plugins(args.config, args.overrides)
    return cfg, open_store(cfg)


def _where(store) -> str:
    primary = getattr(store, "primary", store)
    return f"{primary.name} {getattr(primary, 'url_safe', getattr(primary, 'path', ''))}".strip()


async def ping(args) -> int:
    _, store = _open(args)
    try:
        t0 = time.perf_counter()
        await store.ping()
        print(f"store {_where(store)}: OK ({(time.perf_counter() - t0) * 1000:.2f} ms)")
        return 0
    except StoreError as exc:
        print(f"filterd store: {exc} — check [store] url/mode/password/tls and that the server "
              f"accepts connections from this host")
        return 1
    finally:
        await store.close()


async def show(args) -> int:
    cfg, store = _open(args)
    model = ReputationModel(cfg.section("reputation") or {})
    subject = args.subject.strip()
    is_ip = any(c.isdigit() for c in subject) and "@" not in subject and (
        ":" in subject or subject.replace(".", "").isdigit())
    try:
        if is_ip:
            standings = await model.lookup(store, subject, "")
            net = client_network(subject, int(cfg.get("greylist.ipv4_prefix", 24)),
                                 int(cfg.get("greylist.ipv6_prefix", 64)))
            auto = await store.get_int(f"grey:net:{net}")
        else:
            sender = subject if "@" in subject else f"x@{subject}"
            standings = await model.lookup(store, "", sender)
            auto = None
    except StoreError as exc:
        print(f"filterd store: {exc}")
        return 1
    finally:
        await store.close()
    out = {kind: {"subject": st.subject, "counts": {k: round(v, 2) for k, v in st.counts.items()},
                  "bad_ratio": round(st.bad_ratio, 3), "judged": model.judge(st)}
           for kind, st in standings.items()}
    if auto is not None:
        out["greylist_auto_allow_retries"] = auto
    if args.json:
        print(json.dumps(out))
        return 0
    if not any(v.get("counts") for v in out.values() if isinstance(v, dict)):
        print(f"no history for {subject}")
    for kind, v in out.items():
        if not isinstance(v, dict):
            continue
        counts = " ".join(f"{k}={n}" for k, n in sorted(v["counts"].items())) or "(none)"
        print(f"{kind:<7} {v['subject']:<24} {counts}  bad={v['bad_ratio']:.2f} "
              f"-> {v['judged'] or 'no judgement'}")
    if auto is not None:
        print(f"greylist: {auto} successful retries from this network")
    return 0
