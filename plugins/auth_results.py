"""Authentication-Results (RFC 8601): adds one header with every sender-authentication result
(SPF, DKIM, DMARC, ARC) under the gateway's authserv-id ([auth] authserv_id), and removes
incoming Authentication-Results headers that claim that id. Runs after the other
authentication plugins (see [plugins] order_last)."""
from __future__ import annotations

from filterd.auth import authserv_id, build_authres, forged_ar_removals
from filterd.hookspecs import hookimpl
from filterd.verdict import Modification

CONFIG = """
# Add the header even when no authentication plugin produced a result ("none").
add_when_empty = false
# Remove incoming Authentication-Results headers that claim our authserv-id.
strip_forged = true
"""

KEYS = ("spf", "dkim", "dmarc", "arc")


@hookimpl
def modify(ctx, message, options):
    mods = []
    our_id = authserv_id(ctx.config)
    if options.get("strip_forged", True):
        mods += forged_ar_removals(message.raw, our_id)
    if any(k in ctx.data for k in KEYS) or options.get("add_when_empty"):
        value = build_authres(ctx)
        ctx.data["auth_results"] = value
        mods.append(Modification.add_header("Authentication-Results", value))
    return mods
