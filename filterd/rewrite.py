"""Applying :class:`filterd.verdict.Modification` to raw message bytes.

Only the parts a modification touches change; every other byte (other headers, their folding,
the body) stays exactly as received. The line ending of the header block (CRLF or LF) is kept.
"""
from __future__ import annotations

import email.header
import re

from .verdict import Modification

_FIELD_START = re.compile(rb"^[^\s:]+:")


def split_message(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, separator, body). The separator is the empty line (b"\\r\\n" or b"\\n");
    a message without a body has an empty separator and body.

    Several plugins split the same message: the last answer is kept (for the very same bytes
    object, which cannot change), so the message is searched once."""
    global _last_split
    last = _last_split
    if last[0] is raw:
        return last[1]
    out = _split(raw)
    if type(raw) is bytes:  # (a bytearray could change under the kept answer)
        _last_split = (raw, out)
    return out


def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    if raw.startswith((b"\r\n", b"\n")):
        nl = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
        return b"", nl, raw[len(nl):]
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return raw[:lf + 1], b"\n", raw[lf + 2:]
    if crlf >= 0:
        return raw[:crlf + 2], b"\r\n", raw[crlf + 4:]
    return raw, b"", b""


_last_split: tuple = (None, None)


def header_fields(block: bytes) -> list[bytes]:
    """Raw header fields, each with its continuation lines and line ending."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    v = field.split(b":", 1)[1] if b":" in field else b""
    return re.sub(rb"\r?\n[ \t]+", b" ", v).strip().decode("utf-8", "surrogateescape")


def encode_value(value: str) -> str:
    """Header value safe for the wire: ASCII as is, anything else RFC 2047-encoded."""
    value = value.replace("\r", " ").replace("\n", " ")
    try:
        value.encode("ascii")
        return value
    except UnicodeEncodeError:
        return email.header.Header(value, "utf-8").encode()


MAX_LINE = 998  # RFC 5322 2.1.1: a line must not be longer (without CRLF)


def fold_line(line: str, nl: str, limit: int = MAX_LINE) -> str:
    """Fold a header field longer than RFC 5322's hard line limit at whitespace (unfolding gives
    the same value back, so signatures over relaxed-canonicalized headers still hold). Shorter
    fields are left exactly as they are."""
    if len(line) <= limit:
        return line
    out = []
    start = line.find(":") + 2
    while len(line) > limit:
        cut = line.rfind(" ", start, limit)
        if cut <= 0:
            break  # no whitespace to fold at: leave the rest as it is
        out.append(line[:cut])
        line = line[cut:]  # the continuation line starts with the whitespace
        start = 1
    out.append(line)
    return nl.join(out)


def format_field(name: str, value: str, nl: bytes) -> bytes:
    line = fold_line(f"{name}: {encode_value(value)}", nl.decode("ascii"))
    return line.encode("ascii", "replace") + nl


def apply_modifications(raw: bytes, mods: list[Modification]) -> bytes:
    if not mods:
        return raw
    block, sep, body = split_message(raw)
    nl = b"\r\n" if b"\r\n" in (block or raw[:2000]) else b"\n"
    fields = header_fields(block)
    if fields and not fields[-1].endswith(b"\n"):
        fields[-1] += nl
    added: list[bytes] = []
    for m in mods:
        if m.kind == "add_header":
            added.append(format_field(m.name, m.value, nl))
        elif m.kind == "remove_header":
            lname = m.name.lower()
            fields = [f for f in fields if not (field_name(f) == lname and
                                                (not m.value or field_value(f) == m.value))]
        elif m.kind == "change_header":
            fields = _change(fields, m.name, m.value, nl)
        elif m.kind == "rewrite_subject":
            old = next((field_value(f) for f in fields if field_name(f) == "subject"), "")
            new = (m.value.replace("{subject}", old) if "{subject}" in m.value
                   else f"{m.value} {old}")
            fields = _change(fields, "Subject", new.strip(), nl)
        elif m.kind == "replace_body" and m.body is not None:
            body = m.body
            sep = sep or nl
    return b"".join(added) + b"".join(fields) + sep + body


def _change(fields: list[bytes], name: str, value: str, nl: bytes) -> list[bytes]:
    lname = name.lower()
    for i, f in enumerate(fields):
        if field_name(f) == lname:
            # keep the value raw when it is already wire-safe (e.g. an encoded subject)
            fields[i] = format_field(name, value, nl)
            return fields
    return fields + [format_field(name, value, nl)]
