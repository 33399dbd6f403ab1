"""Every message of the MIME torture collections (Stalwart mail-parser, mime4j, MIME-tools)
goes through the real `filterd check`: no crash, a verdict for each, parsed views usable."""
from __future__ import annotations

import json
import time

import pytest

from conftest import DATA, run_filterd

MIME = DATA / "mime"
MESSAGES = sorted(p for p in MIME.rglob("*") if p.suffix in (".eml", ".msg"))


def test_the_torture_collections_are_present():
    assert len(MESSAGES) > 150


@pytest.mark.timeout(600)
def test_every_torture_message_gets_a_verdict_without_crashing():
    proc = run_filterd("check", "--json", "--rcpt", "user@example.org",
                       *map(str, MESSAGES), timeout=600)
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.strip()]
    assert [d["file"] for d in lines] == list(map(str, MESSAGES))
    for d in lines:
        assert d["recipients"] == {"user@example.org": d["action"]}
        assert d["action"] in {"accept", "add_header", "quarantine", "reject"}, d


def test_parsed_view_of_every_torture_message_is_usable_and_bounded():
    from filterd.model import Message

    slowest = 0.0
    for path in MESSAGES:
        t0 = time.process_time()
        m = Message(path.read_bytes())
        p = m.parsed
        # touch every lazily built view: none may raise
        _ = (p.headers, p.subject, p.from_address, p.parts, p.attachments, p.text_parts,
             p.urls, p.url_hosts, p.defects)
        for part in p.parts:
            assert part.size == len(part.payload)
        slowest = max(slowest, time.process_time() - t0)
    print(f"slowest parse: {slowest * 1000:.1f} ms CPU")


def _shape(msg):
    """Everything the parsed view reads from an email.message.Message, recursively."""
    return (msg.get_unixfrom(), msg.items(), [type(d).__name__ for d in msg.defects],
            msg.is_multipart(), msg.get_content_type(),
            [_shape(p) for p in msg.get_payload()] if msg.is_multipart()
            else msg.get_payload())


EDGE_CASES = [
    b"Subject: plain\r\n\r\nbody\r\n",
    b"Subject: lf only\n\nbody\nmore\n",
    b"Subject: no body\r\n",
    b"Subject: empty body\r\n\r\n",
    b"\r\nbody without headers\r\n",
    b"Subject: a\r\nnot a header line\r\nX: y\r\n\r\nbody\r\n",
    b"Subject: a\r\n folded\r\n\tagain\r\n\r\nbody\r\n",
    b"From someone@example.com Fri Nov 27 00:00:00 2026\nSubject: mbox\n\nbody\n",
    b"Subject: mixed\r\nX: 1\n\r\nbody\r\n\r\nsecond paragraph\n",
    b"Content-Type:\r\n multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\npart\r\n--b--\r\n",
    b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n",
    b"Content-Type: text/plain; charset=utf-8\r\nSubject: \xc3\xa9t\xc3\xa9\r\n\r\n"
    b"\xff\xfe bytes\r\n",
    b"Subject: no final newline\r\n\r\nbody",
    b"Subject: space line\r\n \r\n\r\nbody\r\n",
    b": empty name\r\n\r\nbody\r\n",
]


@pytest.mark.parametrize("source", ["edge cases", "torture collections"])
def test_fast_single_part_parse_gives_the_same_message_as_the_email_package(source):
    """filterd.model.parse_email skips the email package's line-by-line body scan for
    one-part messages: the result must be the object message_from_bytes builds."""
    import email
    import email.policy

    from filterd.model import parse_email

    raws = EDGE_CASES if source == "edge cases" else [p.read_bytes() for p in MESSAGES]
    for raw in raws:
        full = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert _shape(parse_email(raw)) == _shape(full), raw[:300]


def _as_milter_fields(raw: bytes, lead_space: bool):
    """The header fields of ``raw`` one by one, as an MTA hands them to a milter (name, value
    after the colon with CRLF line endings; with ``lead_space`` the value keeps the white space
    after the colon), and the message the milter rebuilds from them and the body."""
    from filterd.rewrite import split_message

    block, _, body = split_message(raw)
    fields: list[list[bytes]] = []
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b"\r\n" + line
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append([name, value if lead_space else value.lstrip(b" \t")])
    sep = b":" if lead_space else b": "
    rebuilt = b"".join(n + sep + v + b"\r\n" for n, v in fields) + b"\r\n" + body
    return rebuilt, [(n, v) for n, v in fields]


MILTER_EDGE_CASES = EDGE_CASES + [
    b"Subject: a bare\rCR inside\r\n\r\nbody\r\n",
    b"Subject : space before the colon\r\n\r\nbody\r\n",
    b"X-Empty:\r\nX-Blank: \r\n\r\nbody\r\n",
    b"X-Fold:\r\n\tvalue on the next line\r\n\r\nbody\r\n",
    b"X-Eight: caf\xc3\xa9 \xff\r\n\r\nbody\r\n",
]


@pytest.mark.parametrize("lead_space", [False, True], ids=["plain", "leading-space"])
@pytest.mark.parametrize("source", ["edge cases", "torture collections"])
def test_message_from_milter_header_fields_equals_the_parsed_message(source, lead_space):
    """The milter hands the pipeline the header fields as the MTA sent them, and parsing
    then skips the header block: the result must still be what message_from_bytes builds of
    the same bytes (a field the parser would read differently falls back to parsing)."""
    import email
    import email.policy

    from filterd.model import Message

    raws = (MILTER_EDGE_CASES if source == "edge cases"
            else [p.read_bytes() for p in MESSAGES])
    for original in raws:
        raw, fields = _as_milter_fields(original, lead_space)
        full = email.message_from_bytes(raw, policy=email.policy.compat32)
        assert _shape(Message(raw, fields).parsed.email) == _shape(full), raw[:300]


@pytest.mark.parametrize("raw, expected", [
    (b"A: 1\r\n\r\nbody\r\n\r\nmore", (b"A: 1\r\n", b"\r\n", b"body\r\n\r\nmore")),
    (b"A: 1\n\nbody\r\n\r\n", (b"A: 1\n", b"\n", b"body\r\n\r\n")),
    (b"A: 1\r\nB: 2\n\nbody", (b"A: 1\r\nB: 2\n", b"\n", b"body")),  # mixed: first wins
    (b"A: 1\n\r\n\r\nbody", (b"A: 1\n\r\n", b"\r\n", b"body")),
    (b"A: 1\r\n", (b"A: 1\r\n", b"", b"")),
    (b"\r\nbody", (b"", b"\r\n", b"body")),
    (b"\nbody", (b"", b"\n", b"body")),
    (b"", (b"", b"", b"")),
])
def test_split_message_cuts_at_the_first_empty_line_of_either_style(raw, expected):
    from filterd.rewrite import split_message

    assert split_message(raw) == expected
    assert split_message(raw) == expected  # the kept answer for the same bytes
    changing = bytearray(raw)
    assert split_message(changing) == expected
    changing[:0] = b"\r\n"  # a bytearray is split afresh each time
    assert split_message(changing)[0] == b""


FROM_FIELDS = [
    "<bench@example.com>", "John Smith <john@example.com>", "john@example.com", " a@b ",
    "John<a@b.c>", "John Smith<a@b>", "J <a@b>", "John Smith <a@b> ", "a+tag@example.co.uk",
    "o'brien@example.ie", "{x}@y", "a@-b", "=?utf-8?q?x?= <a@b>",
    # forms the address parser must read (the fast path must leave them alone)
    "John  Smith <a@b>", '"John" <a@b>', "a..b@c", ".a@b", "a@b.", "John Q. Public <a@b>",
    "x <a@b", "a@b>", "<a@b> x", "a@b, c@d", "a@[1.2.3.4]", "<>", "", "\tJ\t<a@b>",
    "x@y z@w", "John (comment) <a@b>", "a@b (comment)", "undisclosed-recipients:;",
]


@pytest.mark.parametrize("source", ["samples", "torture collections"])
def test_usual_from_fields_read_as_the_address_parser_reads_them(source):
    """ParsedMessage.from_addresses reads the usual From forms without the email package's
    address parser: whatever it reads must be what email.utils.getaddresses gives."""
    import email.utils

    from filterd.model import Message, _simple_address

    if source == "samples":
        fields = FROM_FIELDS
        assert sum(_simple_address(f) is not None for f in fields) == 13  # the fast path runs
    else:
        fields = [v for p in MESSAGES for v in Message(p.read_bytes()).parsed.get_all("From")]
    for value in fields:
        fast = _simple_address(value)
        if fast is not None:
            assert [fast] == email.utils.getaddresses([value]), value
