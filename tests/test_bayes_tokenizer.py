"""Tokenizer edge cases: encoded words, broken charsets, huge HTML, base64 garbage."""
from __future__ import annotations

import base64
import os

from filterd.bayes import tokenize
from filterd.bayes import tokenizer as tk


def msg(headers: str, body: bytes | str) -> bytes:
    if isinstance(body, str):
        body = body.encode()
    return headers.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body


def test_encoded_word_subject_is_decoded_and_its_charset_recorded():
    raw = msg("From: a@b.example\nSubject: =?utf-8?B?R3LDvMOfZSBhdXMgTcO8bmNoZW4=?=\n"
              "Content-Type: text/plain", "hello there")
    toks = tokenize(raw)
    assert "subj:grüße" in toks and "subj:münchen" in toks
    assert "enc:subject:utf-8:b" in toks


def test_broken_encoded_word_does_not_raise_and_keeps_the_words():
    raw = msg("Subject: =?x-unknown-cs?Q?cheap=ZZpills?= now\nContent-Type: text/plain", "x")
    toks = tokenize(raw)
    assert "enc:subject:x-unknown-cs:q" in toks
    assert any(t.startswith("subj:") for t in toks)


def test_unknown_and_broken_charsets_fall_back_and_are_flagged():
    unknown = tokenize(msg("Content-Type: text/plain; charset=klingon-8",
                           "plain words remain visible"))
    assert "charset:unknown" in unknown and "visible" in unknown
    broken = tokenize(msg("Content-Type: text/plain; charset=utf-8",
                          b"caf\xe9 ol\xe9 \xff\xfe words survive"))
    assert "charset:broken" in broken and "survive" in broken
    undeclared = tokenize(msg("Content-Type: text/plain", b"na\xefve \xe9t\xe9 anyway"))
    assert "charset:undeclared8bit" in undeclared and "anyway" in undeclared


def test_cp1251_text_is_decoded_with_its_charset():
    body = "Скидки только сегодня".encode("cp1251")
    toks = tokenize(msg("Content-Type: text/plain; charset=windows-1251", body))
    assert "скидки" in toks and "сегодня" in toks


def test_html_is_reduced_to_text_with_tag_and_attribute_hints():
    html = ('<html><body><font color="red" size=7>BUY NOW</font>'
            '<div style="display:none">hidden words</div>'
            '<a href="http://click.spam-host.example.co.uk/track?u=1">here</a>'
            '<script>var notatoken = 1;</script></body></html>')
    toks = tokenize(msg("Content-Type: text/html", html))
    assert {"tag:font", "attr:color", "attr:size", "html:hidden", "buy"} <= toks
    assert "url:host:click.spam-host.example.co.uk" in toks
    assert "url:dom:example.co.uk" in toks
    assert "notatoken" not in toks  # script content is not text


def test_huge_html_is_bounded():
    html = "<p><b>word1</b> filler</p>"
    huge = "<html>" + "".join(f"<p class=c{i}><b>w{i}x</b></p>" for i in range(300_000)) + "</html>"
    assert len(huge) > 5_000_000
    toks = tokenize(msg("Content-Type: text/html", huge + html))
    assert len(toks) <= tk.MAX_TOKENS
    assert "tag:p" in toks


def test_base64_garbage_gives_a_bounded_token_set_and_no_exception():
    garbage = base64.encodebytes(os.urandom(300_000))
    raw = msg("MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
              "Content-Transfer-Encoding: base64", garbage)
    toks = tokenize(raw)
    assert len(toks) <= tk.MAX_TOKENS
    broken = msg("MIME-Version: 1.0\nContent-Type: text/plain\nContent-Transfer-Encoding: base64",
                 "!!!not base64 at all ===== \x00\x01")
    tokenize(broken)  # must not raise


def test_long_words_become_skip_tokens():
    toks = tokenize(msg("Content-Type: text/plain", "a" * 45 + " normal"))
    assert "skip:a40" in toks and "normal" in toks


def test_attachments_give_type_extension_and_name_tokens():
    raw = msg('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"',
              '--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n'
              '--b\r\nContent-Type: application/octet-stream; name="Invoice.PDF.exe"\r\n'
              'Content-Disposition: attachment; filename="Invoice.PDF.exe"\r\n'
              'Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n')
    toks = tokenize(raw)
    assert {"att:type:application/octet-stream", "att:ext:exe", "att:name:invoice.pdf.exe",
            "attached"} <= toks


def test_headers_are_prefixed_and_other_filters_verdicts_ignored():
    raw = msg("From: \"Lucky Winner\" <promo@deals.example>\nTo: a@x.example, b@y.example\n"
              "Subject: cheap\nX-Spam-Status: Yes, score=99\nX-Mailer: MassMailer 5\n"
              "Content-Type: text/plain", "cheap")
    toks = tokenize(raw)
    assert {"subj:cheap", "cheap", "from:dom:deals.example", "from:name:lucky",
            "to:count:2", "mailer:massmailer"} <= toks
    assert not any("x-spam" in t.lower() for t in toks)


def test_cjk_text_yields_character_pairs():
    toks = tokenize(msg("Content-Type: text/plain; charset=utf-8", "今日は特別価格です"))
    assert "cjk:特別" in toks


def test_tokenize_is_deterministic():
    raw = msg("Subject: hello world\nContent-Type: text/plain", "some body text here")
    assert tokenize(raw) == tokenize(raw)


def test_nested_message_and_rfc2231_filenames_are_walked():
    inner = ("From: x@inner.example\r\nSubject: inner\r\nContent-Type: text/plain\r\n\r\n"
             "innerword appears here\r\n")
    raw = msg('MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="outer"',
              "preamble\r\n--outer\r\nContent-Type: multipart/alternative; boundary=alt\r\n\r\n"
              "--alt\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
              "Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 qpword\r\n"
              "--alt--\r\n"
              "--outer\r\nContent-Type: message/rfc822\r\n\r\n" + inner +
              "--outer\r\nContent-Type: application/pdf\r\n"
              "Content-Disposition: attachment; filename*=utf-8''%E2%82%AC%20bill.pdf\r\n\r\n"
              "JVBERi0=\r\n--outer--\r\nepilogue\r\n")
    toks = tokenize(raw)
    assert {"café", "qpword", "innerword", "att:ext:pdf", "att:name:€ bill.pdf",
            "part:message/rfc822"} - toks == {"part:message/rfc822"}  # rfc822 is walked into
    assert "part:text/plain" in toks and "charset:iso-8859-1" in toks


def test_mime_nesting_bomb_is_bounded():
    depth = 500
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                   for i in range(depth))
    raw = ("Subject: bomb\r\nMIME-Version: 1.0\r\n" + head + "Content-Type: text/plain\r\n\r\n"
           "deepword\r\n").encode()
    toks = tokenize(raw)
    assert "defect:deep" in toks and "deepword" not in toks
    many = "".join("--m\r\nContent-Type: text/plain\r\n\r\nw%d\r\n" % i for i in range(5000))
    toks = tokenize(msg('Content-Type: multipart/mixed; boundary="m"', many + "--m--\r\n"))
    assert "parts:many" in toks


def test_fast_word_split_finds_the_same_words_as_the_word_pattern():
    text = ("Hello, world!! e-mail me at bob@example.com -- it's $100 (or 50%) "
            "'quoted' _under_score_ ...dots... a--b x.y.z. café naïve 50€ “smart quotes” "
            "self-made... don't! <tag> [bracket] {brace} #hash +plus =eq ~tilde `tick` ^c "
            "wörter-mit-umlaut 'ÉLAN' ab a1 abc123def")
    out = set()
    tk._words(text, "", out)
    expected = {w for w in tk._WORD_RE.findall(text.lower())
                if tk.MIN_WORD <= len(w) <= tk.MAX_WORD}
    assert out == expected


def test_a_word_written_with_capitals_is_the_same_token_as_in_lower_case():
    # one token per word, whatever its case: a capitalised word counted as itself and as its
    # lower case outweighed the others (token format 3)
    raw = msg("Subject: FREE Offer inside\nContent-Type: text/plain",
              "Dear Friend, this is ABSOLUTELY free and plain words stay lower")
    toks = tokenize(raw)
    assert {"absolutely", "dear", "friend", "free", "plain"} <= toks
    assert {"subj:free", "subj:offer", "subj:inside"} <= toks
    assert not any(":cs:" in t or t.startswith("cs:") for t in toks)
    assert tokenize(raw.replace(b"ABSOLUTELY", b"absolutely")) == toks


def test_capitals_in_html_text_count_but_markup_does_not():
    html = '<HTML><BODY><P STYLE="x">Order NOW</P><SCRIPT>HiddenCode()</SCRIPT></BODY></HTML>'
    toks = tokenize(msg("Content-Type: text/html", html))
    assert {"order", "now", "tag:p", "tag:body", "attr:style"} <= toks
    assert not any("hiddencode" in t.lower() for t in toks)


def test_date_and_message_id_formats_become_shape_tokens():
    toks = tokenize(msg("Message-ID: <20021008.A1b2@mx.example.com>\n"
                        "Date: Wed, 07 Oct 2020 23:01:36 -1900\nContent-Type: text/plain", "x"))
    assert {"mid:shape:9.A9a9", "mid:dom:example.com", "date:tz:-1900",
            "date:shape:Aa, 9 Aa 9 9:9:9 -9"} <= toks
    bare = tokenize(msg("Content-Type: text/plain", "no date, no id"))
    assert {"mid:none", "date:none"} <= bare


def test_received_tokens_come_from_the_from_clause_only():
    raw = msg("Received: from mail.sender-isp.example (mail.sender-isp.example [192.0.2.77])\n"
              "\tby mx.our-gateway.example (Postfix) with ESMTP id ABC\n"
              "\tfor <bob@our-gateway.example>; Tue, 8 Oct 2002 10:58:16 +0100\n"
              "Content-Type: text/plain", "x")
    toks = tokenize(raw)
    assert {"rcvd:sender-isp.example", "rcvd:ip:192.0.2"} <= toks
    assert not any("our-gateway" in t for t in toks if t.startswith("rcvd:"))


def test_urls_are_found_as_the_url_pattern_finds_them():
    """find_urls looks for "://" and "www." first; it must give exactly the pattern's matches,
    in order and without overlaps, on real text and on text built to confuse it."""
    import random
    from pathlib import Path

    samples = ["see http://a.example.com/x and www.b.example.org, https://www.c.example.net/",
               "xhttps://q.example ftp://f.example/p hxxp://no.example wwww.d.example",
               "www.http://nested.example/ then https:// alone and www. alone",
               "://x www.www.e.example (http://p.example/a) <https://q.example/b>"
               + " http://" + "z" * 500]
    for p in sorted((Path(__file__).parent / "data").rglob("*")):
        if p.is_file():
            samples.append(p.read_bytes().decode("latin-1").lower())
    rng = random.Random(20261129)
    pieces = ["http", "https", "ftp", "://", "www.", "w", "h", "s", ".", "/", "a", "b", " ",
              "\n", "<", ">", '"', "'", ")", "]", "é"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
                for _ in range(3000)]
    for text in samples:
        assert tk.find_urls(text, 200) == tk._URL_RE.findall(text)[:200], text[:200]
    text = " ".join(f"http://h{i}.example/" for i in range(300))
    assert tk.find_urls(text, 5) == tk._URL_RE.findall(text)[:5]


def test_attribute_names_are_found_as_tag_by_tag():
    """The attribute hints come from one pattern pass over all tags' texts joined by NUL: the
    same names as looking at each tag alone, also where a tag's text ends or starts the way a
    name or an "=" would continue it."""
    import random

    rng = random.Random(20261129)
    pieces = ["<a", "<img", "<p", "<x1", ">", " ", "\n", "href", "src", "=", '"', "'", "x",
              "-", "on-click", "\0", "data-y", "  =", "=z", "< b", "<!--", "-->"]
    for _ in range(3000):
        markup = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 50)))
        tags = tk._TAG_RE.findall(markup.lower())[:5000]
        one_by_one = set()
        for _, rest in tags:
            if "=" in rest:
                one_by_one.update(tk._ATTR_RE.findall(rest))
        out = set()
        tk._html_tokens(markup, markup.lower(), out)
        assert {t[5:] for t in out if t.startswith("attr:")} == one_by_one, markup


def test_links_in_markup_are_found_as_the_link_pattern_finds_them():
    """find_hrefs tries the link pattern only at "href", "src" and "action": the same links as
    the pattern's own scan, also with an end position that cuts a link."""
    import random
    from pathlib import Path

    samples = ['<a href="http://x.example/a">x</a><img src=\'y.png\'><form action=/post>',
               "hrefsrcaction = x href=  'a b' src=>", "<a HREF=X>", "hhref=1 ssrc=2 aaction=3"]
    for p in sorted((Path(__file__).parent / "data").rglob("*")):
        if p.is_file():
            samples.append(p.read_bytes().decode("latin-1").lower())
    rng = random.Random(20261129)
    pieces = ["href", "src", "action", "=", " ", '"', "'", ">", "h", "s", "a", "x", "/", "\n",
              "hre", "sr", "actio", "é"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
                for _ in range(3000)]
    for text in samples:
        for end in (len(text), len(text) // 2, 7):
            assert tk.find_hrefs(text, 200, end) == tk._HREF_RE.findall(text, 0, end)[:200], \
                text[:200]
    many = " ".join(f"href=h{i}" for i in range(300))
    assert tk.find_hrefs(many, 5, len(many)) == tk._HREF_RE.findall(many)[:5]
