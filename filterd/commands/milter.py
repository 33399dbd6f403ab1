"""``filterd milter``: run only the milter front door (for Postfix ``smtpd_milters`` or
Sendmail ``INPUT_MAIL_FILTER``). ``filterd serve --milter SPEC`` runs it next to the others."""
from __future__ import annotations

import argparse

EPILOG = """examples:
  filterd milter --listen inet:11340@127.0.0.1
  filterd milter --listen unix:/run/filterd/milter.sock --workers 2
Postfix:  smtpd_milters = inet:127.0.0.1:11340   milter_default_action = tempfail
(see README "Milter mode" for the full Postfix and Sendmail configuration)"""


def register(sub, common) -> None:
    p = sub.add_parser("milter", parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="run the milter for Postfix/Sendmail (same pipeline as the gateway)")
    p.add_argument("--listen", "--milter", dest="listen", metavar="SOCKET",
                   help="inet:PORT@HOST, inet6:PORT@HOST or unix:/path (default: [milter] listen)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="milter processes sharing the socket (default: [milter] workers; "
                        "0 = one per CPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..milter import run_milter
    from ..pipeline import load_config_and_plugins

    config, _ = load_config_and_plugins(args.config, args.overrides)
    return run_milter(config, args.config, args.overrides, listen=args.listen,
                      workers=args.workers)
