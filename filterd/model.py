"""The three state levels a message passes through, kept apart:

- :class:`Session` — one client connection: peer address and name, HELO, TLS, authenticated user.
- :class:`Transaction` — one envelope: MAIL FROM with its ESMTP parameters and the recipients,
  each a :class:`Recipient` carrying its own outcome.
- :class:`Message` — the raw bytes, kept exact, and a parsed view built lazily on first use
  (:class:`ParsedMessage`). A malformed message still gives a usable view: problems are recorded
  in ``defects`` and never raised.
"""
from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import email.utils
import functools
import html
import ipaddress
import itertools
import os
import random
import re
import time
from dataclasses import dataclass, field
from email.message import Message as _EmailMessage
from functools import cached_property

from .rewrite import split_message
from .verdict import Verdict

# Bounds that keep hostile messages cheap to look at.
MAX_PARTS = 1000
MAX_DEPTH = 30
MAX_TEXT_PER_PART = 1_000_000
MAX_URLS = 1000


def new_id(digits: int) -> str:
    """A random hex id for a session: unique, not a secret (quarantine entries and release
    links have their own unguessable ids). uuid4() read the kernel's random pool twice per
    message, a measurable share of a milter's work."""
    # the module's generator: seeded from os.urandom, and reseeded in a forked child (milter
    # and gateway workers), so processes never share a sequence
    return f"{random.getrandbits(digits * 4):0{digits}x}"


def _new_sequence() -> None:
    global _sequence, _process_tag
    _sequence = itertools.count(random.getrandbits(20))
    _process_tag = os.getpid() & 0xFFF


_sequence: itertools.count
_process_tag: int
_new_sequence()
os.register_at_fork(after_in_child=_new_sequence)  # milter and gateway workers: their own


def transaction_id() -> str:
    """A transaction's id (X-Filterd-ID, the trace, the logs): 16 hex digits, the second it
    was made (8), the process id's last 12 bits (3) and a counter that starts at a random
    place in each process (5). Ids from one process never repeat within a second; worker
    processes forked one after the other differ in their process ids' last bits, and where two
    do not, they repeat an id only if their counters meet within the same second.

    They grow with time, so the trace index (``filterd track``) adds each at the end of its id
    index: random ids scattered the inserts over the whole index, which cost three times as
    much per event once it held a busy day's mail (100,000 events: 65 against 23 us). Like
    Postfix's long queue ids, an id shows when its message came, which its Received headers
    say anyway."""
    return (f"{int(time.time()) & 0xFFFFFFFF:08x}{_process_tag:03x}"
            f"{next(_sequence) & 0xFFFFF:05x}")


@functools.lru_cache(maxsize=16384)  # a new Session per connection; clients come back
def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address as written (a ``%zone`` suffix dropped), or None when it is not one."""
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


@dataclass
class Session:
    peer_ip: str = "127.0.0.1"
    peer_port: int = 0
    peer_name: str = ""  # reverse DNS name, "" when unknown
    helo: str = ""
    tls: bool = False
    tls_version: str = ""
    tls_cipher: str = ""
    auth_user: str = ""  # authenticated (SASL) user, "" when not authenticated
    local_ip: str = ""
    local_port: int = 0
    front_door: str = "check"  # "smtp", "submission", "proxy", "milter", "check"
    id: str = field(default_factory=lambda: new_id(12))
    started: float = field(default_factory=time.time)
    data: dict = field(default_factory=dict)  # scratch space for plugins, per connection

    _ip: tuple = field(default=("", None), init=False, repr=False, compare=False)

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """``peer_ip`` parsed (None when it is not an address); parsed again only when
        ``peer_ip`` changed (plugins ask several times per message)."""
        text, ip = self._ip
        if text != self.peer_ip:
            ip = parse_address(self.peer_ip)
            self._ip = (self.peer_ip, ip)
        return ip


@dataclass
class Recipient:
    address: str
    params: dict[str, str] = field(default_factory=dict)
    original: str = ""  # the address as the client gave it, before alias rewriting
    verdict: Verdict = field(default_factory=Verdict.cont)
    data: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.original:
            self.original = self.address

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]


@dataclass
class Transaction:
    session: Session
    mail_from: str = ""  # "" is the null sender <>
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    id: str = field(default_factory=transaction_id)
    started: float = field(default_factory=time.time)
    data: dict = field(default_factory=dict)  # scratch space for plugins, per transaction

    @property
    def sender_domain(self) -> str:
        return self.mail_from.rpartition("@")[2].lower() if "@" in self.mail_from else ""

    def recipient(self, address: str) -> Recipient | None:
        for r in self.recipients:
            if r.address.lower() == address.lower():
                return r
        return None


@dataclass
class Part:
    """One leaf of the MIME tree."""

    content_type: str
    filename: str
    size: int  # decoded size in bytes
    disposition: str  # "attachment", "inline" or ""
    depth: int
    charset: str
    payload: bytes  # decoded content (transfer encoding undone)
    path: str  # position in the tree, e.g. "1.2"
    defects: list[str] = field(default_factory=list)

    @property
    def is_text(self) -> bool:
        return self.content_type.startswith("text/") and not self.is_attachment

    @property
    def is_attachment(self) -> bool:
        return bool(self.filename) or self.disposition == "attachment" or not (
            self.content_type.startswith("text/")
            or self.content_type.startswith("multipart/")
            or self.content_type == "message/rfc822"
        )

    def text(self) -> str:
        data = self.payload[:MAX_TEXT_PER_PART]
        for cs in (self.charset, "utf-8", "latin-1"):
            if not cs:
                continue
            try:
                return data.decode(cs, errors="replace" if cs == "utf-8" else "strict")
            except (LookupError, UnicodeDecodeError):
                continue
        return data.decode("latin-1")


_URL_RE = re.compile(r"""(?i)\b((?:https?|ftp)://[^\s<>"'\)\]]+|www\.[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s<>"'\)\]]*)""")
_HREF_RE = re.compile(r"""(?i)(?:href|src|action)\s*=\s*["']?([^"'\s>]+)""")
_TAG_RE = re.compile(r"(?s)<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>", re.I)
_WS_RE = re.compile(r"[ \t\r\f\v]+")
_UNFOLD_RE = re.compile(r"\r?\n[ \t]*")


def html_to_text(markup: str) -> str:
    """Visible text of an HTML part (good enough for scoring, not for display)."""
    text = _TAG_RE.sub(" ", markup[:MAX_TEXT_PER_PART])
    text = html.unescape(text)
    return _WS_RE.sub(" ", text)


def decode_header_value(value) -> str:
    """RFC 2047 decoding that never raises: undecodable words are kept as they are."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        value = str(value)
    value = str(value)
    if "=?" not in value:
        return value
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # noqa: BLE001 - broken encoded words are common in spam
        return value


# A Content-Type header that makes a message a MIME tree (the email package must walk the body).
_TREE_TYPE = re.compile(rb"(?im)^content-type[ \t]*:[ \t\r\n]*(?:multipart|message)/")


def parse_email(raw: bytes, fields: list[tuple[bytes, bytes]] | None = None) -> _EmailMessage:
    """``email.message_from_bytes(raw)`` (compat32), the same object, built faster for a
    message that is one part: the package reads a body line by line (a quarter of the cost of
    scanning a plain 5 KB message), so only the header block goes through its parser and the
    body becomes the payload as it is. Anything else (a multipart or message/* type, a header
    block the parser does not take whole: no empty line, a line that is no header...) is
    parsed the usual way.

    ``fields``: the header fields as an MTA handed them over one by one (the milter: name and
    value bytes, the value as after the colon, CRLF line endings), in the order ``raw`` holds
    them. Where each is a plain field, the header block is not parsed again: every field goes
    through the same policy step the parser ends with, which gives the same object."""
    block, sep, body = split_message(raw)
    if sep and not _TREE_TYPE.search(block):
        msg = _from_fields(fields) if fields is not None else None
        if msg is None:
            msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
                block + sep, headersonly=True)
        if not msg.defects and not msg.get_payload():
            msg.set_payload(body.decode("ascii", "surrogateescape"))
            return msg
    return email.message_from_bytes(raw, policy=email.policy.compat32)


# A header name as the email package's parser takes it (its feedparser.headerRE, without the
# "From " separator line and continuation lines)
_FIELD_NAME = re.compile(r"[\041-\071\073-\176]+")


def _from_fields(fields: list[tuple[bytes, bytes]]) -> _EmailMessage | None:
    """The compat32 message the parser would make of these header fields (headers only), or
    None when one of them is not a plain field (a name the parser would not take, a line
    break that is not CRLF followed by white space): the caller then parses the block.

    For a plain field the parser's last step (compat32's ``header_source_parse``: the white
    space after the colon stripped, inner line breaks kept, the final one dropped) comes down
    to ``value.lstrip(" \t")``; tests compare the result with the parser's on every torture
    message."""
    msg = _EmailMessage(policy=email.policy.compat32)
    for name_b, value_b in fields:
        name = name_b.decode("ascii", "surrogateescape")
        value = value_b.decode("ascii", "surrogateescape")
        if not _FIELD_NAME.fullmatch(name):
            return None
        if "\r" in value or "\n" in value:
            lines = value.split("\r\n")
            if any("\r" in ln or "\n" in ln for ln in lines) or \
                    not all(ln[:1] in (" ", "\t") for ln in lines[1:]):
                return None
        msg.set_raw(name, value.lstrip(" \t"))
    return msg


# An address field of the usual forms: "local@domain", "<local@domain>" or "Display Name
# <local@domain>" (dot-atoms, a display name of plain words with single spaces): what
# email.utils.getaddresses makes of them is known without its parser (tests compare both).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ADDR = _ATEXT + r"(?:\." + _ATEXT + r")*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_FIELD = re.compile(r"[ \t]*(?:(" + _ATEXT + "(?: " + _ATEXT + r")*)? ?<(" + _DOT_ADDR
                           + r")>|(" + _DOT_ADDR + r"))[ \t]*")


def _simple_address(value: str) -> tuple[str, str] | None:
    """(display name, address) of a field of one of the usual forms, else None."""
    m = _SIMPLE_FIELD.fullmatch(value)
    if m is None:
        return None
    if m.group(3) is not None:
        return ("", m.group(3))
    return (m.group(1) or "", m.group(2))


class ParsedMessage:
    """A read-only view of a message built with the standard ``email`` package (compat32 policy,
    which never raises on bad input). All properties are computed once and bounded in size."""

    def __init__(self, raw: bytes, fields: list[tuple[bytes, bytes]] | None = None):
        self._defects: list[str] = []
        try:
            self.email: _EmailMessage = parse_email(raw, fields)
        except Exception as exc:  # noqa: BLE001 - the parser is robust, but never trust it fully
            self._defects.append(f"unparseable message: {exc!r}")
            self.email = email.message_from_bytes(b"", policy=email.policy.compat32)
        self._defects.extend(type(d).__name__ for d in getattr(self.email, "defects", []))

    @property
    def defects(self) -> list[str]:
        """Everything wrong with the message: parser defects, limits hit, undecodable parts."""
        _ = self.parts  # walking the tree records part-level defects
        return self._defects

    # -- headers ----------------------------------------------------------------------------
    @cached_property
    def headers(self) -> list[tuple[str, str]]:
        """All headers in order, values RFC 2047-decoded and unfolded."""
        out = []
        for name, value in self.email.items():
            v = decode_header_value(value)
            if "\n" in v:
                v = _UNFOLD_RE.sub(" ", v)
            out.append((name, v.strip()))
        return out

    @cached_property
    def header_index(self) -> dict[str, list[str]]:
        """Lower-cased header name -> its values in order (one pass for every lookup)."""
        out: dict[str, list[str]] = {}
        for n, v in self.headers:
            out.setdefault(n.lower(), []).append(v)
        return out

    def header(self, name: str, default: str = "") -> str:
        values = self.header_index.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str) -> list[str]:
        return list(self.header_index.get(name.lower(), ()))

    @property
    def subject(self) -> str:
        return self.header("Subject")

    @cached_property
    def from_addresses(self) -> list[tuple[str, str]]:
        """(display name, address) pairs from every From header."""
        values = self.get_all("From")
        simple = [_simple_address(v) for v in values]
        if all(simple):  # the usual forms, without the address parser (10-20 us a header)
            return simple
        try:
            return email.utils.getaddresses(values)
        except Exception:  # noqa: BLE001
            return []

    @property
    def from_address(self) -> str:
        addrs = [a for _, a in self.from_addresses if a]
        return addrs[0] if addrs else ""

    @property
    def from_domain(self) -> str:
        addr = self.from_address
        return addr.rpartition("@")[2].lower().rstrip(">") if "@" in addr else ""

    @property
    def message_id(self) -> str:
        return self.header("Message-ID").strip()

    # -- MIME tree --------------------------------------------------------------------------
    @cached_property
    def parts(self) -> list[Part]:
        """Leaf parts in document order; nested message/rfc822 parts are descended into.
        Walks iteratively with a depth and a count limit so hostile nesting stays cheap."""
        parts: list[Part] = []
        stack = [(self.email, 0, "1")]
        while stack:
            node, depth, path = stack.pop()
            if len(parts) >= MAX_PARTS:
                self._defects.append(
                    f"too many MIME parts (more than {MAX_PARTS}); rest not scanned")
                break
            if depth > MAX_DEPTH:
                self._defects.append(f"MIME nesting deeper than {MAX_DEPTH} at part {path}")
                continue
            try:
                ctype = node.get_content_type()
            except Exception:  # noqa: BLE001
                ctype = "text/plain"
            if node.is_multipart():
                try:
                    children = node.get_payload()
                except Exception:  # noqa: BLE001
                    children = []
                if not isinstance(children, list):
                    children = []
                if len(children) > MAX_PARTS:
                    self._defects.append(f"too many MIME parts (more than {MAX_PARTS}) in part "
                                         f"{path}; rest not scanned")
                for i, child in reversed(list(enumerate(children[:MAX_PARTS], 1))):
                    if isinstance(child, _EmailMessage):
                        stack.append((child, depth + 1, f"{path}.{i}"))
                continue
            parts.append(self._leaf(node, ctype, depth, path))
        return parts

    def _leaf(self, node: _EmailMessage, ctype: str, depth: int, path: str) -> Part:
        defects = [type(d).__name__ for d in getattr(node, "defects", [])]
        try:
            payload = node.get_payload(decode=True)
        except Exception as exc:  # noqa: BLE001
            defects.append(f"undecodable payload: {exc!r}")
            payload = None
        if payload is None:
            raw = node.get_payload()
            payload = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
        try:
            filename = decode_header_value(node.get_filename() or "")
        except Exception:  # noqa: BLE001
            filename = ""
        try:
            charset = (node.get_content_charset() or "").strip().lower()
        except Exception:  # noqa: BLE001
            charset = ""
        disp = str(node.get("Content-Disposition") or "").split(";")[0].strip().lower()
        self._defects.extend(defects)
        return Part(ctype, filename, len(payload), disp, depth, charset, payload, path, defects)

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.is_attachment]

    @cached_property
    def text_parts(self) -> list[str]:
        """Decoded text of every text part; HTML reduced to its visible text."""
        out = []
        for p in self.parts:
            if not p.is_text:
                continue
            t = p.text()
            out.append(html_to_text(t) if p.content_type == "text/html" else t)
        return out

    @cached_property
    def html_parts(self) -> list[str]:
        return [p.text() for p in self.parts if p.is_text and p.content_type == "text/html"]

    @property
    def text(self) -> str:
        return "\n".join(self.text_parts)

    @cached_property
    def urls(self) -> list[str]:
        """URLs in text and HTML parts (href/src attributes and bare links), de-duplicated."""
        seen: dict[str, None] = {}
        sources = [p.text() for p in self.parts if p.is_text]
        for src in sources:
            # the regexes scan every position; most text has no link at all, and a link needs
            # "://" or "www." in any case (cheap substring tests first: lower() of a whole
            # text costs more than the two searches for the "w." that "www." ends with)
            if "://" not in src and ("w." not in src and "W." not in src
                                     or "www." not in src.lower()):
                continue
            if "=" in src:
                for m in _HREF_RE.finditer(src):
                    u = html.unescape(m.group(1))
                    if u.lower().startswith(("http://", "https://", "ftp://", "www.")):
                        seen.setdefault(u, None)
            for m in _URL_RE.finditer(src):
                seen.setdefault(m.group(1).rstrip(".,;:!?"), None)
            if len(seen) >= MAX_URLS:
                break
        return list(seen)[:MAX_URLS]

    @cached_property
    def url_hosts(self) -> list[str]:
        hosts: dict[str, None] = {}
        for u in self.urls:
            rest = u.split("://", 1)[1] if "://" in u else u
            host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
            host = host.rpartition("@")[2].split(":", 1)[0].strip("[]").lower().rstrip(".")
            if host:
                hosts.setdefault(host, None)
        return list(hosts)


class Message:
    """Raw bytes, kept exactly as received, plus a lazily built :class:`ParsedMessage`."""

    def __init__(self, raw: bytes, fields: list[tuple[bytes, bytes]] | None = None):
        """``fields``: the header fields as the MTA handed them over, when a front door has
        them (the milter; see :func:`parse_email`): parsing then skips the header block."""
        self.raw = bytes(raw)
        self._fields = fields
        self._parsed: ParsedMessage | None = None

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def parsed(self) -> ParsedMessage:
        if self._parsed is None:
            self._parsed = ParsedMessage(self.raw, self._fields)
            self._fields = None
        return self._parsed

    # shortcuts to the parsed view
    def header(self, name: str, default: str = "") -> str:
        return self.parsed.header(name, default)

    @property
    def defects(self) -> list[str]:
        return self.parsed.defects

    def header_block_and_body(self) -> tuple[bytes, bytes]:
        """(header block including the empty line, body), split at the first empty line."""
        block, sep, body = split_message(self.raw)
        return block + sep, body
