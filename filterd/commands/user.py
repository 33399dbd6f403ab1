"""``filterd user add|passwd|del|list|hash``: the SMTP AUTH users file (see filterd.smtp.auth).

The file is ``--file PATH`` or ``[smtp] users_file``. Passwords are read from the terminal (asked
twice) or, with ``--password-stdin``, from the first line of standard input (scripts).
"""
from __future__ import annotations

import getpass
import sys
from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("user", parents=[common], help="manage SMTP AUTH users (submission)")
    usub = p.add_subparsers(dest="user_command", metavar="ACTION")
    for name, helptext in (("add", "add a user"), ("passwd", "change a user's password"),
                           ("del", "remove a user"), ("list", "list users"),
                           ("hash", "print a user:hash line without touching any file")):
        c = usub.add_parser(name, parents=[common], help=helptext)
        if name != "list":
            c.add_argument("name", help="user name (usually an e-mail address)")
        c.add_argument("--file", metavar="PATH", help="users file (default: [smtp] users_file)")
        if name in ("add", "passwd", "hash"):
            c.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin")
        c.set_defaults(func=run, action=name)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _password(args) -> str:
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            raise SystemExit("filterd user: the passwords differ; nothing changed")
    if not pw:
        raise SystemExit("filterd user: empty password refused")
    return pw


def _file(args) -> Path:
    if args.file:
        return Path(args.file)
    from ..config import load
    cfg = load(args.config, args.overrides)
    f = cfg.get("smtp.users_file")
    if not f:
        raise SystemExit("filterd user: no users file: give --file PATH or set [smtp] users_file")
    return Path(f)


def run(args) -> int:
    from ..smtp.auth import hash_password, read_users, write_users

    if args.action == "hash":
        print(f"{args.name}:{hash_password(_password(args))}")
        return 0
    path = _file(args)
    try:
        users = read_users(path) if path.exists() else {}
    except (OSError, ValueError) as exc:
        print(f"filterd user: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for u in sorted(users):
            print(u)
        return 0
    if args.action == "add" and args.name in users:
        print(f"filterd user: {args.name} already exists in {path} (use passwd)", file=sys.stderr)
        return 1
    if args.action in ("passwd", "del") and args.name not in users:
        print(f"filterd user: no user {args.name} in {path}", file=sys.stderr)
        return 1
    if ":" in args.name or any(c.isspace() for c in args.name):
        print("filterd user: user names may not contain ':' or spaces", file=sys.stderr)
        return 2
    if args.action == "del":
        del users[args.name]
        password = None
    else:
        password = _password(args)
        users[args.name] = hash_password(password)
    write_users(path, users)
    dovecot = _dovecot_passwd(args)
    if dovecot is not None:  # the mailstore's IMAP side (Dovecot) reads its own copy
        from ..mailstore.dovecot import update_passwd

        update_passwd(dovecot, args.name, password)
    print(f"filterd user: {args.action} {args.name}: done ({path})")
    return 0


def _dovecot_passwd(args):
    """The Dovecot passwd-file to keep in step, or None when only --file was given and no
    config names one (scripts that just manage an SMTP AUTH file)."""
    from ..config import load
    from ..mailstore.dovecot import passwd_path

    try:
        cfg = load(args.config, args.overrides)
    except Exception:  # noqa: BLE001 - the users file was written; the config is checked elsewhere
        return None
    if args.file and not cfg.get("mailstore.dovecot_passwd"):
        return None
    return passwd_path(cfg)
