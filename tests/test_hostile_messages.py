"""Hostile and broken messages: each yields a verdict and a usable view, never an exception."""
from __future__ import annotations

import os

import pytest

from conftest import make_message
from filterd.model import MAX_DEPTH, MAX_PARTS, Message


def nested_multipart(depth: int) -> bytes:
    head = b"From: a@example.com\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
    body = b""
    for i in range(depth):
        body += f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
    body += b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for i in reversed(range(depth)):
        body += f"--b{i}--\r\n".encode()
    return head + body


def many_parts(n: int) -> bytes:
    out = [b'From: a@example.com\r\nSubject: parts\r\nMIME-Version: 1.0\r\n'
           b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n']
    for i in range(n):
        out.append(f"--x\r\nContent-Type: text/plain\r\n\r\npart {i}\r\n".encode())
    out.append(b"--x--\r\n")
    return b"".join(out)


CASES = {
    "empty": b"",
    "binary_garbage": os.urandom(20000),
    "nul_bytes": b"Subject: nul\x00here\r\n\r\nbody\x00\x00\r\n",
    "truncated_headers": b"From: a@example.com\r\nSubject: trunc",
    "truncated_multipart": (b"Content-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\n"
                            b"Content-Type: text/pl"),
    "eight_bit_headers": ("Subject: Grüße aus Köln\r\nFrom: Jörg <j@exämple.de>\r\n"
                          "\r\nÄÖÜ\r\n").encode("latin-1"),
    "bad_encoded_words": b"Subject: =?utf-8?B?!!!notbase64?= =?x-unknown?Q?abc?=\r\n\r\nhi\r\n",
    "bad_base64_attachment": (b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                              b"Content-Type: application/octet-stream; name=\"x.bin\"\r\n"
                              b"Content-Transfer-Encoding: base64\r\n\r\n"
                              b"@@@@not base64####\r\n--b--\r\n"),
    "bad_charset": (b"Content-Type: text/plain; charset=\"x-no-such-charset\"\r\n\r\n"
                    b"hello\xff\xfe\r\n"),
    "lf_only": b"From: a@example.com\nSubject: lf\n\nbody\n",
    "huge_line": b"Subject: long\r\n\r\n" + b"A" * 2_000_000 + b"\r\n",
    "deep_nesting": nested_multipart(MAX_DEPTH * 4),
    "thousands_of_parts": many_parts(MAX_PARTS + 500),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_hostile_message_gets_a_verdict(name, pipeline_factory):
    pipe = await pipeline_factory()
    result = await pipe.scan(CASES[name], "a@example.com", ["b@example.org"])
    assert result.outcomes["b@example.org"].action.value in ("accept", "add_header")
    m = Message(CASES[name])
    assert isinstance(m.parsed.headers, list)
    assert len(m.parsed.parts) <= MAX_PARTS
    result.message_bytes()  # applying modifications must work too


def test_limits_are_recorded_as_defects():
    deep = Message(nested_multipart(MAX_DEPTH + 5)).parsed
    assert any("nesting deeper" in d for d in deep.defects)
    many = Message(many_parts(MAX_PARTS + 10)).parsed
    assert any("too many MIME parts" in d for d in many.defects)


def test_parsed_view_decodes_headers_parts_and_urls():
    raw = (b"From: =?utf-8?Q?J=C3=B6rg?= <jorg@example.de>\r\nSubject: =?utf-8?B?R3LDvMOfZQ==?=\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
           b"Content-Type: text/html; charset=utf-8\r\n\r\n"
           b"<p>Hi <a href=\"https://Evil.Example.net/x?y=1\">here</a> "
           b"www.shop.example.org/page</p>\r\n"
           b"--b\r\nContent-Type: application/pdf; name=\"inv.pdf\"\r\n"
           b"Content-Disposition: attachment; filename=\"inv.pdf\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b--\r\n")
    p = Message(raw).parsed
    assert p.subject == "Grüße"
    assert p.from_address == "jorg@example.de" and p.from_domain == "example.de"
    assert "Hi here" in p.text
    assert "https://Evil.Example.net/x?y=1" in p.urls
    assert {"evil.example.net", "www.shop.example.org"} <= set(p.url_hosts)
    [att] = p.attachments
    assert (att.filename, att.content_type, att.size) == ("inv.pdf", "application/pdf", 9)
    assert att.payload.startswith(b"%PDF")


def test_plain_message_has_no_defects():
    assert Message(make_message()).parsed.defects == []
