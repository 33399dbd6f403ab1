"""``filterd list``: create mailing lists and manage their members (data in the shared store)."""
from __future__ import annotations

import json

from ..lists import ListManager
from ..pipeline import load_config_and_plugins
from ..services import Services


def register(sub, common) -> None:
    p = sub.add_parser("list", parents=[common], help="mailing lists: create, members, show")
    lsub = p.add_subparsers(dest="list_command", metavar="ACTION")
    c = lsub.add_parser("create", parents=[common], help="create a list")
    c.add_argument("address")
    c.add_argument("--owner", action="append", default=[], help="owner/moderator (repeatable)")
    c.add_argument("--description", default="")
    c.add_argument("--open", action="store_true",
                   help="anyone may post (default: non-member posts wait for a moderator)")
    c.set_defaults(func=lambda a: _run(a, create))
    d = lsub.add_parser("delete", parents=[common], help="delete a list")
    d.add_argument("address")
    d.set_defaults(func=lambda a: _run(a, delete))
    for name, fn, helptext in (("add", add, "add members"), ("remove", remove, "remove members")):
        s = lsub.add_parser(name, parents=[common], help=helptext)
        s.add_argument("address")
        s.add_argument("members", nargs="+")
        s.set_defaults(func=lambda a, fn=fn: _run(a, fn))
    s = lsub.add_parser("show", parents=[common], help="a list's settings and members")
    s.add_argument("address")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=lambda a: _run(a, show))
    s = lsub.add_parser("ls", parents=[common], help="all lists")
    s.set_defaults(func=lambda a: _run(a, ls))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


async def _run(args, fn) -> int:
    cfg, _ = load_config_and_plugins(args.config, args.overrides)
    services = Services(cfg)
    try:
        return await fn(args, ListManager(services.store))
    finally:
        await services.close()


async def create(args, m: ListManager) -> int:
    try:
        info = await m.create(args.address, args.owner, args.description, not args.open)
    except ValueError as exc:
        print(f"filterd list: {exc}")
        return 1
    print(f"created {info.address}; posts: {info.address}, help: {info.cmd('request')}, "
          f"subscribe: {info.cmd('subscribe')}")
    return 0


async def delete(args, m: ListManager) -> int:
    if not await m.delete(args.address):
        print(f"filterd list: no list {args.address}")
        return 1
    print(f"deleted {args.address}")
    return 0


async def _need(m: ListManager, address: str):
    info = await m.get(address)
    if info is None:
        print(f"filterd list: no list {address} (create it with `filterd list create`)")
    return info


async def add(args, m: ListManager) -> int:
    if await _need(m, args.address) is None:
        return 1
    n = await m.add_members(args.address, *args.members)
    print(f"{n} member(s) added to {args.address}")
    return 0


async def remove(args, m: ListManager) -> int:
    if await _need(m, args.address) is None:
        return 1
    n = await m.remove_members(args.address, *args.members)
    print(f"{n} member(s) removed from {args.address}")
    return 0


async def show(args, m: ListManager) -> int:
    info = await _need(m, args.address)
    if info is None:
        return 1
    data = {k: v for k, v in info.to_dict().items() if k != "secret"}
    data["members"] = await m.members(args.address)
    data["disabled"] = await m.disabled(args.address)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for k, v in data.items():
        print(f"{k}: {', '.join(v) if isinstance(v, list) else v}")
    return 0


async def ls(args, m: ListManager) -> int:
    for a in await m.all():
        print(a)
    return 0
