"""Tokenizer: turns a message into the set of tokens the Bayesian classifier counts.

It looks at what a sender controls, each kind of token under its own prefix so that the same word
in a Subject and in a body are different evidence:

- selected headers: ``subj:`` words, ``from:`` address/domain/name words, ``to:`` domains and
  recipient count, ``rt:`` Reply-To, ``rp:`` Return-Path, ``mid:`` Message-ID domain and shape,
  ``date:`` the Date header's time zone and shape (``mid:none``/``date:none`` when missing),
  ``mailer:`` X-Mailer/User-Agent words, ``rcvd:`` the host domains and /24 networks in the
  *from* clause of the Received headers (who handed the message on; the *by* host is the
  receiving relay), ``enc:`` RFC 2047 encoded-word charsets and encodings, ``charset:`` declared
  charsets;
- every text part, decoded (transfer encoding and charset undone; a broken charset falls back to
  UTF-8 with replacement, then Latin-1): body words lower-cased (a word written with capitals
  is the same token: see :data:`TOKEN_FORMAT` 3), long words summarised as ``skip:`` tokens,
  runs of CJK characters as character pairs;
- HTML reduced to its visible text, plus ``tag:`` and ``attr:`` hints (which tags and attributes
  were used, not their values);
- URLs: ``url:`` host, registrable domain (approximated), path words, IP literal, port and
  scheme hints;
- attachments: ``att:`` content types, file name extensions and names; ``part:``/``cte:``
  structure tokens; ``defect:`` parser defects.

A ``<x>:shape:`` token is the header's format with its content taken out: runs of digits become
``9``, of lower-case letters ``a``, of capitals ``A`` (``<20021008.A1b2@x>`` -> ``<9.9A9a9@a>``).

Work is bounded per message (parts, bytes of text per part and per message, HTML bytes, URLs,
headers and the number of distinct tokens), so a hostile message costs no more than a large
ordinary one. The hot paths avoid per-character Python work: headers are parsed once, straight
from the bytes; words are split in C (see :func:`_words`; a pure-Python path gives the same
tokens where the extension is not built, or with ``FILTERD_PURE_PYTHON=1``).

Changing what tokens a message gives means bumping :data:`TOKEN_FORMAT` (databases trained with
an older format are then reported as needing a retrain).
"""
from __future__ import annotations

import binascii
import functools
import html as _html
import operator
import os
import re
import urllib.parse
from dataclasses import dataclass

from ..model import Message, decode_header_value

# The token format. Bump it whenever a change makes the tokens of the same message differ: a
# database trained with another format must be retrained (the store counts the messages learned
# with this format; ``filterd bayes stats`` and classification say so when some were not).
#   1: filterd up to 2026-11 (no marker in the database)
#   2: case-preserving cs: tokens, Date/Message-ID shapes, Received from-clause only
#   3: no cs: tokens (2026-11-30): a word written with capitals counted twice, as itself and
#      as its lower case, so capitalised words outweighed the rest; without them, recall at
#      0.1 % FPR on the SpamAssassin corpus' 5-fold split went 94.2-94.8 % -> 95.0-95.2 % over
#      three deals of the folds, with 17 % fewer tokens a message (bench/README.md)
TOKEN_FORMAT = 3

# -- bounds -------------------------------------------------------------------------------------
MAX_PARTS = 60  # leaf parts looked at
MAX_TEXT = 200_000  # characters of decoded text per part
MAX_MESSAGE_TEXT = 200_000  # characters of visible text per message (all parts together)
MAX_HTML = 400_000  # characters of HTML markup per part
MAX_HEADERS = 120  # headers looked at
MAX_URLS = 200
MAX_TOKENS = 4000  # distinct tokens per message
MAX_CJK_PAIRS = 2000
MIN_WORD, MAX_WORD = 3, 20

# Headers that carry another filter's verdict (or the corpus collector's): never learn them, a
# filter must not learn to trust (or to copy) someone else's label.
IGNORED_HEADER_PREFIXES = ("x-spam", "x-bogosity", "x-dspam", "x-filterd", "x-rspamd",
                           "x-virus", "x-quarantine", "x-crm114", "x-ham-report")

_WORD_RE = re.compile(r"[^\W_](?:[\w'$€£%.@-]*[\w$€£%])?")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]{2,}")
_TAG_RE = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,15})\b([^>]{0,2000})>")
_ATTR_RE = re.compile(r"\s([a-zA-Z][a-zA-Z-]{0,20})\s*=")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)
# (character classes, not (?i): a case-insensitive pattern is several times slower)
_STRIP_RE = re.compile(r"(?s)<([sS][cC][rR][iI][pP][tT]|[sS][tT][yY][lL][eE])\b.*?</\1\s*>"
                       r"|<!--.*?-->|<[^>]*>")
# scripts, styles, comments and tags each replaced by a space (the C extension's strip_tags
# does the same without the pattern)
_strip_tags_py = functools.partial(_STRIP_RE.sub, " ")
_URL_RE = re.compile(r"""(?:https?://|ftp://|www\.)[^\s<>"'\)\]]{1,400}""")
_HREF_RE = re.compile(r"""(?:href|src|action)\s*=\s*["']?([^"'\s>]{1,400})""")
_ENCWORD_RE = re.compile(r"=\?([^?\s]{1,40})\?([bBqQ])\?")
_HOST_RE = re.compile(r"([a-z0-9][a-z0-9-]{0,62}(?:\.[a-z0-9-]{1,63}){0,8}\.[a-z]{2,24})")
_RCVD_SPLIT_RE = re.compile(r"[\s()\[\]<>;,=@/]+")
_IP_RE = re.compile(r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.\d{1,3}\b")
_ADDR_RE = re.compile(r"([\w.+'=-]{1,64})@([\w-]{1,63}(?:\.[\w-]{1,63}){0,8})")

# Second-level labels under which registrations happen (co.uk, com.au, ...): a short, stable
# approximation of the public suffix list, good enough to group URL hosts into domains.
_SLD = {"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go", "gob", "mil", "nom"}

# The header fields the tokenizer reads, and what each gives: the branch of _header_tokens_py,
# numbered for the C extension's header_tokens (its H_* codes)
_HEADER_CODES = {"subject": 1, "from": 2, "sender": 3, "to": 4, "cc": 5, "reply-to": 6,
                 "errors-to": 7, "return-path": 8, "message-id": 9, "date": 10, "x-mailer": 11,
                 "user-agent": 11, "received": 12, "content-type": 13, "list-id": 14,
                 "organization": 14, "precedence": 14, "x-priority": 14, "importance": 14,
                 "content-transfer-encoding": 15}
_SELECTED = frozenset(_HEADER_CODES)

assert not any(h.startswith(IGNORED_HEADER_PREFIXES) for h in _SELECTED)


def registrable_domain(host: str) -> str:
    labels = host.split(".")
    if len(labels) >= 3 and labels[-2] in _SLD and len(labels[-1]) == 2:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _words(text: str, prefix: str, out: set, lowered: bool = False) -> None:
    """Lower-cased words of ``text`` (prefixed); long words become ``skip:`` summaries.

    A word starts with a letter or digit, ends with one (or ``$ % € £``) and may hold
    ``' . @ -`` inside (the same words as :data:`_WORD_RE` finds). The text is cut into chunks
    at every character that cannot be in a word, and only the few distinct chunks that are not
    plain letters/digits of a usable length are looked at one by one: in one C pass when the
    extension ``filterd/bayes/_speedups.c`` is built (:data:`SPEEDUPS`), else with a few
    C-speed string operations (:func:`_split_words_py`); both give the same words.
    ``lowered``: the caller has lower-cased ``text`` already."""
    if not lowered:
        text = text.lower()
    words, long, cjk = _split_words(text)
    if prefix:
        out.update({prefix + w for w in words})
    else:
        out.update(words)
    if long:
        long.sort()
        out.update({f"{prefix}skip:{w[0]}{min(len(w), 200) // 10 * 10}" for w in long[:200]})
        # e-mail addresses and dotted names inside long runs still tell something
        for w in long[:50]:
            for piece in _SPLIT_RE.split(w):
                if MIN_WORD <= len(piece) <= MAX_WORD:
                    out.add(prefix + piece)
    if cjk and (not prefix or prefix == "subj:"):
        for run in _CJK_RE.findall(text)[:200]:
            for i in range(min(len(run) - 1, MAX_CJK_PAIRS)):
                out.add(prefix + "cjk:" + run[i:i + 2])


def _split_words_py(text: str) -> tuple[set[str], list[str], bool]:
    """The words of ``text`` as written: (words of 3-20 characters, longer ones, whether the text
    may hold CJK characters). The C extension's ``split_words`` does the same in one pass, and
    says exactly whether there are CJK characters (see :data:`_split_words`)."""
    chunks = set(text.encode("utf-8", "replace").translate(_NONWORD).decode("utf-8", "replace")
                 .split())
    words = {c for c in chunks if MIN_WORD <= len(c) <= MAX_WORD and c.isalnum()}
    long = []
    for c in chunks - words:
        if len(c) < MIN_WORD:
            continue
        if c.isascii():  # only word characters and '$%.@-_ are left in it
            c = c.lstrip("'$%.@-_").rstrip("'.@-")
            found = (c,)
        else:
            found = _WORD_RE.findall(c)
        for w in found:
            n = len(w)
            if MIN_WORD <= n <= MAX_WORD:
                words.add(w)
            elif n > MAX_WORD:
                long.append(w)
    return words, long, not text.isascii()


def _speedups():
    """The C word splitter (filterd/bayes/_speedups.c, built with the package when a compiler
    is there), or None: not built, or FILTERD_PURE_PYTHON=1 in the environment."""
    if os.environ.get("FILTERD_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from . import _speedups as mod
    except ImportError:
        return None
    return mod


# The word splitter in use: the C one when it was built (the same results,
# tests/test_bayes_speedups.py; it takes a quarter off the time to tokenize a message), else
# the Python one. SPEEDUPS says which.
_c = _speedups()
SPEEDUPS = _c is not None
_split_words_c = functools.partial(_c.split_words, _WORD_RE.findall) if _c else None
_split_words = _split_words_c or _split_words_py

_SPLIT_RE = re.compile(r"[.@/-]+")
_URL_PATH_SPLIT_RE = re.compile(r"[/?&=#.+_%-]+")
# bytes.translate table: ASCII that is never part of a word -> space
_NONWORD = bytes(i if i >= 128 or chr(i).isalnum() or chr(i) in "_'$%.@-" else 32
                 for i in range(256))


def find_urls(text: str, limit: int) -> list[str]:
    """``_URL_RE.findall(text)[:limit]``, tried only where a URL can start: before each "://"
    (at "https", "http" or "ftp") and at each "www.". The pattern alone stops at every h, f and
    w of the text; these few string searches find the same matches, left to right and not
    overlapping (tests/test_bayes_tokenizer.py compares both)."""
    starts = []
    i = text.find("://")
    while i >= 0:
        if i >= 5 and text.startswith("https", i - 5):
            starts.append(i - 5)
        elif i >= 4 and text.startswith("http", i - 4):
            starts.append(i - 4)
        elif i >= 3 and text.startswith("ftp", i - 3):
            starts.append(i - 3)
        i = text.find("://", i + 3)
    i = text.find("www.")
    while i >= 0:
        starts.append(i)
        i = text.find("www.", i + 4)
    return _matches_at(_URL_RE, text, starts, limit, len(text))


def find_hrefs(markup: str, limit: int, endpos: int) -> list[str]:
    """``_HREF_RE.findall(markup, 0, endpos)[:limit]``, tried only at each "href", "src" and
    "action" (the pattern alone stops at every h, s and a), the same way as :func:`find_urls`."""
    starts = []
    for word in ("href", "src", "action"):  # (none overlaps itself or starts like another)
        i = markup.find(word, 0, endpos)
        while i >= 0:
            starts.append(i)
            i = markup.find(word, i + len(word), endpos)
    return _matches_at(_HREF_RE, markup, starts, limit, endpos)


def _matches_at(pattern: re.Pattern, text: str, starts: list[int], limit: int,
                endpos: int) -> list[str]:
    """What ``pattern.findall(text, 0, endpos)[:limit]`` gives when every match of
    ``pattern`` begins at one of ``starts``: a match is tried at each start in order, skipping
    those inside the match before (its one group, or the whole match without a group)."""
    out: list[str] = []
    end = 0
    match = pattern.match
    group = pattern.groups
    for s in sorted(starts):
        if s < end:
            continue  # inside the match found before
        m = match(text, s, endpos)
        if m is not None:
            out.append(m.group(group))
            end = m.end()
            if len(out) >= limit:
                break
    return out


def _url_tokens(url: str, out: set) -> None:
    _url_words(url.strip().rstrip(".,;:!?)'\"").lower(), out)


def _url_words_py(u: str, out: set) -> None:
    """The ``url:`` tokens of one URL ``u`` (stripped and lower-cased). The C extension's
    ``url_words`` does the same in one pass over the URL."""
    if u.startswith("www."):
        scheme, rest = "http", u
    elif "://" in u:
        scheme, rest = u.split("://", 1)
    else:
        return
    out.add("url:scheme:" + scheme[:10])
    hostport = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in hostport:
        out.add("url:userinfo")
        hostport = hostport.rpartition("@")[2]
    host, _, port = hostport.partition(":")
    host = host.strip("[]").rstrip(".")
    if not host:
        return
    if port:
        out.add("url:port")
    if _IP_RE.fullmatch(host) or ":" in host:
        out.add("url:ip")
        return
    if len(host) > 100:
        out.add("url:longhost")
        return
    out.add("url:host:" + host)
    out.add("url:dom:" + registrable_domain(host))
    path = rest[len(hostport):]
    if len(path) > 1:
        for piece in _URL_PATH_SPLIT_RE.split(path[:300]):
            if 3 <= len(piece) <= 20 and not piece.isdigit():
                out.add("url:p:" + piece)


def _attr_names_py(text: str) -> set[str]:
    """The attribute names :data:`_ATTR_RE` finds in ``text`` (the C extension's
    ``attr_names`` finds the same from each "=" backwards)."""
    return set(_ATTR_RE.findall(text))


def _tag_parts_py(lower: str) -> tuple[set[str], str]:
    """The names of the first 5,000 tags :data:`_TAG_RE` finds in ``lower``, and their texts
    joined with NULs (picked out of the pattern's pairs at C speed: a message has hundreds of
    tags and a dozen distinct names). The C extension's ``tag_parts`` does the same without
    the pattern."""
    tags = _TAG_RE.findall(lower)[:5000]
    return set(map(_FIRST, tags)), "\0".join(map(_SECOND, tags))


def _html_tokens(markup: str, lower: str, out: set) -> str:
    """Add tag/attribute hints and return the visible text (as written; ``lower`` is the
    lower-cased ``markup``)."""
    markup = markup[:MAX_HTML]
    lower = lower[:MAX_HTML]
    names, texts = _tag_parts(lower)
    out.update(["tag:" + t for t in names])
    # the attribute names of all tags in one pass: a NUL between two tags' texts is neither a
    # space nor part of a name, so no match spans it and the names found are those of the tags
    # one by one (a pattern call per tag cost more than the pass)
    attrs = _attr_names(texts)
    out.update(["attr:" + a for a in attrs])
    if "display:none" in lower or "visibility:hidden" in lower:
        out.add("html:hidden")
    if lower.count("<!--") > 20:
        out.add("html:manycomments")
    text = _strip_tags(markup)
    return _html.unescape(text) if "&" in text else text


def _addresses_py(text: str, most: int) -> list[tuple[str, str]]:
    """The first ``most`` (local part, domain) pairs :data:`_ADDR_RE` finds in ``text`` (the C
    extension's ``addresses`` finds the same from each "@")."""
    return _ADDR_RE.findall(text)[:most]


def _address_tokens(value: str, prefix: str, out: set, with_local: bool = True) -> int:
    n = 0
    if "@" not in value:
        return 0
    for local, dom in _addresses(value, 50):
        dom = dom.lower()
        n += 1
        out.add(f"{prefix}dom:{dom}")
        if with_local:
            out.add(f"{prefix}addr:{local.lower()}@{dom}")
    return n


_UNFOLD_RE = re.compile(r"\n[ \t]+")
# the continuation lines of a header block joined to their lines (the C extension's unfold
# does the same in one pass)
_unfold_py = functools.partial(_UNFOLD_RE.sub, " ")


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """Header block and body of a message or MIME part (either line-ending style)."""
    if data.startswith((b"\n", b"\r\n")):
        return b"", data[data.find(b"\n") + 1:]
    end = data.find(b"\n\n")
    end2 = data.find(b"\r\n\r\n")
    if end2 >= 0 and (end < 0 or end2 < end):
        return data[:end2 + 2], data[end2 + 4:]
    if end >= 0:
        return data[:end + 1], data[end + 2:]
    return data, b""


def raw_headers(raw: bytes, block: bytes | None = None) -> list[tuple[str, str]]:
    """(lower-cased name, unfolded raw value) of the header block, read straight from the
    bytes (much cheaper than the email package's header objects); an 8-bit block is taken as
    UTF-8, else Latin-1. Lines that are not ``name: value`` (or a continuation) are skipped."""
    if block is None:
        block = split_head(raw)[0]
    if block.startswith(b"From "):  # mbox separator line
        block = block[block.find(b"\n") + 1:]
    block = block[:200_000]
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            text = block.decode("latin-1")
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if "\n " in text or "\n\t" in text:
        text = _unfold(text)
    return _header_lines(text, MAX_HEADERS)


def _header_lines_py(text: str, most: int) -> list[tuple[str, str]]:
    """The ``name: value`` lines of the unfolded header block ``text``, at most ``most``: a
    name is printable ASCII without spaces or colons (at most 80 characters; blanks before the
    colon are dropped), given in lower case, the value is the rest of the line, stripped. One
    pattern pass over the block instead of a Python loop per line; the C extension's
    ``header_lines`` does the same without the pattern and the list of pairs to strip."""
    return [(name.lower(), value.strip())
            for name, value in _HEADER_LINE_RE.findall("\n" + text)[:most]]


_HEADER_LINE_RE = re.compile(r"\n([\x21-\x39\x3b-\x7e]{1,80})[ \t]*:([^\n]*)")


# -- a small MIME walker: only what the tokenizer needs, straight from the bytes -----------------
_PARAM_RE = re.compile(r"""(?i)(?:^|;)\s*(charset|boundary|name|filename)(\*)?\s*=\s*"""
                       r"""(?:"([^"]*)"|([^;\s]*))""")
# every byte that is not in the base64 alphabet (deleted by bytes.translate: one C pass)
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(i for i in range(256) if i not in _B64_ALPHABET)
MAX_DEPTH = 12


@dataclass
class MimePart:
    content_type: str
    charset: str
    filename: str
    is_attachment: bool
    payload: bytes  # decoded (empty for attachments: only their names and types count)


def _params(value: str) -> dict[str, str]:
    out = {}
    for key, star, quoted, bare in _PARAM_RE.findall(value):
        v = quoted if quoted else bare
        key = key.lower()
        if star and "''" in v:  # RFC 2231: charset'lang'percent-encoded
            cs, _, rest = v.partition("'")
            rest = rest.partition("'")[2]
            try:
                v = urllib.parse.unquote(rest, encoding=cs or "utf-8", errors="replace")
            except LookupError:
                v = urllib.parse.unquote(rest, errors="replace")
        out.setdefault(key, v)
    return out


def _decode_payload(body: bytes, cte: str, out: set) -> bytes:
    body = body[:MAX_TEXT * 4]
    if cte == "base64":
        data = body.translate(None, _B64_JUNK)
        data = data[: len(data) - len(data) % 4]
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            out.add("defect:base64")
            return b""
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def walk(raw: bytes, out: set, top: tuple | None = None) -> list[MimePart]:
    """Leaf parts of a message, iteratively, bounded in depth and number. ``top`` is the
    message's ``(headers, body)`` when the caller has them already (saves parsing twice)."""
    parts: list[MimePart] = []
    stack = [(raw, 0, True, "text/plain")]
    first = top
    while stack:
        data, depth, top, default_ct = stack.pop()
        if len(parts) >= MAX_PARTS:
            out.add("parts:many")
            break
        if depth > MAX_DEPTH:
            out.add("defect:deep")
            continue
        if first is not None:
            headers, body = first
            first = None
        else:
            head, body = split_head(data)
            headers = raw_headers(b"", head)
        ctype, cte, disp, params, dparams = default_ct, "", "", {}, {}
        for lname, value in headers:
            if lname == "content-type":
                ctype = value.split(";", 1)[0].strip().lower() or default_ct
                params = _params(value)
            elif lname == "content-transfer-encoding":
                cte = value.strip().lower()
            elif lname == "content-disposition":
                disp = value.split(";", 1)[0].strip().lower()
                dparams = _params(value)
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "").encode("latin-1", "replace")
            if not boundary:
                out.add("defect:noboundary")
                ctype = "text/plain"
            else:
                delim = b"\n--" + boundary
                chunks = (b"\n" + body).split(delim)
                children = []
                if len(chunks) > MAX_PARTS + 1:
                    out.add("parts:many")
                for chunk in chunks[1:MAX_PARTS + 1]:
                    if chunk.startswith(b"--"):
                        break
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    child = chunk[nl + 1:]
                    if child.endswith(b"\r"):
                        child = child[:-1]
                    children.append(child)
                if len(chunks) < 2:
                    out.add("defect:nostartboundary")
                sub_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                for child in reversed(children):
                    stack.append((child, depth + 1, False, sub_default))
                continue
        if ctype == "message/rfc822" and not top:
            stack.append((_decode_payload(body, cte, out), depth + 1, True, "text/plain"))
            continue
        filename = dparams.get("filename") or params.get("name") or ""
        if "=?" in filename:
            filename = decode_header_value(filename)
        is_text = ctype.startswith("text/")
        attachment = bool(filename) or disp == "attachment" or not is_text
        payload = b"" if attachment else _decode_payload(body, cte, out)
        parts.append(MimePart(ctype, params.get("charset", "").strip().lower(), filename,
                              attachment, payload))
    return parts


def _received_tokens(raw: str, out: set) -> None:
    """``rcvd:`` registrable domains of the host names (at most 4) and ``rcvd:ip:`` /24
    networks of the bracketed IPv4 addresses (at most 2) in the *from* clause of one Received
    header: who handed the message on. The *by* host is the receiving MTA (our own relays, or
    the previous hop's *from* again), *for* is the recipient and the date says nothing."""
    low = raw.lower()
    cut = low.find(" by ")
    if cut < 0:
        cut = low.find(";")
    if cut >= 0:
        low = low[:cut]
    _received_words(low, out)


def _received_words_py(low: str, out: set) -> None:
    """The tokens of :func:`_received_tokens` from the lower-cased from clause ``low``. The C
    extension's ``received_words`` does the same without a Python loop per word."""
    hosts = ips = 0
    for w in low.split():  # split + a check per piece: cheaper than a pattern scan
        if "." not in w:
            continue
        if w[0] in "[(" and ips < 2:
            m = _IP_RE.fullmatch(w.strip("[]();"))
            if m:
                out.add("rcvd:ip:{}.{}.{}".format(*m.groups()))
                ips += 1
                continue
        if hosts < 4:
            for piece in _RCVD_SPLIT_RE.split(w) if not w.isalnum() else (w,):
                if "." in piece and piece[-1:].isalpha() and (m := _HOST_RE.fullmatch(piece)):
                    out.add("rcvd:" + registrable_domain(m.group(1)))
                    hosts += 1


def _shape_py(s: str) -> str:
    """``<20021008.a1B@x>`` -> ``<9.9a9A@a>``: a header's format without its content
    (non-ASCII characters become ``?``). The C extension's ``shape`` does the same in one
    pass."""
    b = s.encode("ascii", "replace").translate(_SHAPE_TABLE)
    # one pass per class with a literal replacement: a group reference (rb"\1") in the
    # replacement is expanded by Python code for every match, several times slower
    for run, one in _SHAPE_RUNS:
        b = run.sub(one, b)
    return b.decode("ascii")


_SHAPE_TABLE = bytes(57 if 48 <= i <= 57 else 97 if 97 <= i <= 122 else 65 if 65 <= i <= 90
                     else i for i in range(256))  # digit -> 9, lower -> a, upper -> A
_SHAPE_RUNS = [(re.compile(c + rb"{2,}"), c) for c in (b"9", b"a", b"A")]
_CHARSET_RE = re.compile(r'(?i)charset\s*=\s*"?([^";\s]{1,40})')


def _header_tokens_py(headers: list[tuple[str, str]], out: set) -> None:
    """The tokens of the selected header fields (``headers``: :func:`raw_headers`' pairs).
    The C extension's ``header_tokens`` does the same in one pass, calling back the same
    functions for words, encoded words and domains (:data:`_header_tokens`)."""
    received = 0
    seen_mid = seen_date = False
    for lname, raw in headers:
        # (tokens for the mere presence of each header name were tried and left out: they
        # lowered accuracy in cross-validation, mostly echoing how a corpus was collected)
        if lname not in _SELECTED:  # (none of them starts with IGNORED_HEADER_PREFIXES)
            continue
        raw = raw[:4000]
        if "=?" in raw:
            for cs, enc in _ENCWORD_RE.findall(raw)[:10]:
                out.add(f"enc:{lname}:{cs.lower()}:{enc.lower()}")
        if lname == "received":
            received += 1
            if received > 6:
                continue
            _received_tokens(raw, out)
            continue
        value = _decode(raw)
        if lname == "subject":
            _words(value, "subj:", out)
            if value and value.upper() == value and any(ch.isalpha() for ch in value):
                out.add("subj:allcaps")
            if "!!" in value:
                out.add("subj:bangs")
        elif lname in ("from", "sender"):
            pre = "from:" if lname == "from" else "sender:"
            if not _address_tokens(value, pre, out):
                out.add(pre + "noaddr")
            name_part = value.split("<", 1)[0] if "<" in value else ""
            _words(name_part, pre + "name:", out)
        elif lname in ("to", "cc"):
            n = _address_tokens(value, "to:", out, with_local=False)
            out.add(f"{lname}:count:{min(n, 10)}")
        elif lname in ("reply-to", "errors-to"):
            _address_tokens(value, "rt:" if lname == "reply-to" else "et:", out)
        elif lname == "return-path":
            if not _address_tokens(value, "rp:", out, with_local=False):
                out.add("rp:empty")
        elif lname == "message-id":
            seen_mid = True
            local, _, dom = value.rpartition("@")
            dom = dom.strip(" <>").lower()
            out.add("mid:dom:" + registrable_domain(dom)[:60] if dom else "mid:nodomain")
            # the shape of the left part (runs of digits -> 9, lower -> a, upper -> A):
            # mass mailers and forgers make their own
            out.add("mid:shape:" + _shape(local.strip(" <"))[:30])
        elif lname == "date":
            seen_date = True
            zone = value.rsplit(None, 1)[-1] if value.strip() else ""
            out.add("date:tz:" + zone[:12])
            out.add("date:shape:" + _shape(value)[:40])
        elif lname in ("x-mailer", "user-agent"):
            _words(value, "mailer:", out)
        elif lname == "content-type":
            ct = value.split(";", 1)[0].strip().lower()
            out.add("ctype:" + ct[:60])
            m = _CHARSET_RE.search(value)
            if m:
                out.add("charset:" + m.group(1).lower())
        elif lname in ("list-id", "organization", "precedence", "x-priority", "importance"):
            _words(value, lname + ":", out)
        elif lname == "content-transfer-encoding":
            out.add("cte:top:" + value.strip().lower()[:30])

    if not seen_mid:
        out.add("mid:none")
    if not seen_date:
        out.add("date:none")


def _decode(value: str) -> str:
    return decode_header_value(value) if "=?" in value else value


def _charset_of(value: str) -> str | None:
    m = _CHARSET_RE.search(value)
    return m.group(1) if m else None


_header_tokens_c = (functools.partial(
    _c.header_tokens, _HEADER_CODES, (_words, decode_header_value, _ENCWORD_RE.findall,
                                      registrable_domain, _charset_of, _SLD))
    if getattr(_c, "header_tokens", None) else None)
_header_tokens = _header_tokens_c or _header_tokens_py


def tokenize(message: Message | bytes) -> set[str]:
    """The distinct tokens of a message (at most :data:`MAX_TOKENS`)."""
    raw = message.raw if isinstance(message, Message) else bytes(message)
    out: set[str] = set()
    head, body = split_head(raw)
    headers = raw_headers(b"", head)
    _header_tokens(headers, out)
    urls: list[str] = []
    budget = MAX_MESSAGE_TEXT
    for part in walk(raw, out, (headers, body)):
        ctype = part.content_type
        out.add("part:" + ctype[:60])
        if part.charset:
            out.add("charset:" + part.charset[:40])
        if part.is_attachment:
            out.add("att:type:" + ctype[:60])
            name = (part.filename or "").lower().strip()[:100]
            if name:
                ext = name.rpartition(".")[2] if "." in name else ""
                out.add("att:ext:" + ext[:10] if ext else "att:noext")
                out.add("att:name:" + name)
            continue
        text = _part_text(part, out)
        if ctype == "text/html":
            lower = text.lower()
            if len(urls) < MAX_URLS:
                urls.extend(_html.unescape(u) if "&" in u else u
                            for u in find_hrefs(lower, MAX_URLS, MAX_HTML))
            text = _html_tokens(text, lower, out)
        else:
            out.add("body:plain")
        if len(text) > budget:
            text = text[:budget]
            out.add("body:truncated")
        budget -= len(text)
        low = text.lower()
        # (every URL holds "://" or "www.": a search for those is much cheaper than the
        # pattern's scan, which stops at every h, f and w)
        if len(urls) < MAX_URLS and ("://" in low or "www." in low):
            urls.extend(find_urls(low, MAX_URLS))
        _words(low, "", out, lowered=True)
    for u in set(urls[:MAX_URLS]):
        _url_tokens(u, out)
    if len(out) > MAX_TOKENS:
        out = set(sorted(out)[:MAX_TOKENS])
    return out


def _part_text(part, out: set) -> str:
    data = part.payload[:MAX_TEXT * 2]
    cs = part.charset
    if cs:
        try:
            return data.decode(cs)[:MAX_TEXT]
        except LookupError:
            out.add("charset:unknown")
        except UnicodeDecodeError:
            out.add("charset:broken")
        except Exception:  # noqa: BLE001 - some codecs raise other errors on hostile input
            out.add("charset:broken")
    try:
        return data.decode("utf-8")[:MAX_TEXT]
    except UnicodeDecodeError:
        if not cs:
            out.add("charset:undeclared8bit")
        return data.decode("latin-1")[:MAX_TEXT]


# The tokenizer's other passes in C when the extension is built (see _speedups): each
# ``<pass>_c`` gives the same as its ``<pass>_py`` (tests/test_bayes_speedups.py), and
# ``<pass>`` is the one in use.
_header_lines_c = _c.header_lines if _c else None
_unfold_c = _c.unfold if _c else None
_strip_tags_c = _c.strip_tags if _c else None
_tag_parts_c = _c.tag_parts if _c else None
_addresses_c = _c.addresses if _c else None
_received_words_c = functools.partial(_c.received_words, _SLD) if _c else None
_url_words_c = functools.partial(_c.url_words, _SLD) if _c else None
_attr_names_c = _c.attr_names if _c else None
_shape_c = _c.shape if _c else None
_header_lines = _header_lines_c or _header_lines_py
_unfold = _unfold_c or _unfold_py
_strip_tags = _strip_tags_c or _strip_tags_py
_tag_parts = _tag_parts_c or _tag_parts_py
_addresses = _addresses_c or _addresses_py
_received_words = _received_words_c or _received_words_py
_url_words = _url_words_c or _url_words_py
_attr_names = _attr_names_c or _attr_names_py
_shape = _shape_c or _shape_py
