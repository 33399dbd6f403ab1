"""Test-only site plugin (filterd's tests; MIT like filterd): when the body carries
"milter-mods-marker" it removes X-Remove-Me, changes X-Change-Me and replaces the body, so the
milter tests can see header change/delete and body replacement arrive through Postfix."""
from filterd.hookspecs import hookimpl
from filterd.verdict import Modification

CONFIG = ""


@hookimpl
def modify(ctx, message):
    if b"milter-mods-marker" not in message.raw:
        return None
    return [Modification.remove_header("X-Remove-Me"),
            Modification.change_header("X-Change-Me", "changed by filterd"),
            Modification.replace_body(b"The body was replaced by filterd.\r\n")]
