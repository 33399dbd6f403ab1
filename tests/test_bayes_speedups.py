"""The C word splitter (filterd/bayes/_speedups.c) gives exactly what the Python one gives.

The classifier's figures (bench/bayes_bench.py) and every trained token database depend on the
tokens: the C path must never change them, only their cost."""
from __future__ import annotations

import os
import random
import string
import re
import subprocess
import sys
from pathlib import Path

import pytest

from filterd.bayes import tokenizer as tk

DATA = Path(__file__).parent / "data"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "corpus" / "spamassassin"

needs_c = pytest.mark.skipif(not tk.SPEEDUPS, reason="C splitter not built / disabled")

# one character of the class the tokenizer's CJK-pair pattern takes runs of
CJK_CHAR = re.compile(tk._CJK_RE.pattern.removesuffix("{2,}"))
assert CJK_CHAR.pattern != tk._CJK_RE.pattern

# Characters where the two paths could part: word and separator ASCII, letters whose lower case
# changes length or context (İ, Σ, ǅ), non-ASCII white space (NBSP, EM SPACE, IDEOGRAPHIC
# SPACE, NEL, the ASCII separators \x1c-\x1f), a lone surrogate, digits and numbers that are not
# ASCII, CJK, an emoji and the currency signs of the word pattern
ALPHABET = (list("abcXYZ019_'$%.@-  \t\n\r\x0b\x0c!?,;:()<>/\\\"#+=~`^*&|{}[]")
            + ["é", "ß", "İ", "Σ", "ς", "€", "£", "日本", "語", "\u00a0", "\u2003", "\u3000",
               "\x85", "\x1c", "\x1f", "\ud800", "\udfff", "\U0001F600", "٣", "²", "½", "ǅ",
               "ﬁ", "\u200b", "\u0301", "Ⅻ"])


def both(text: str):
    """Both paths' (words, sorted long words) for ``text``."""
    c_words, c_long, c_cjk = tk._split_words_c(text)
    py_words, py_long, _ = tk._split_words_py(text)
    # the C path says exactly whether a character of the tokenizer's CJK class is there (the
    # Python one: maybe)
    assert c_cjk == (CJK_CHAR.search(text) is not None)
    return ((c_words, sorted(c_long)), (py_words, sorted(py_long)))


def test_the_c_splitter_is_built_where_a_compiler_is():
    """CI installs build-essential and python3-dev: the extension must have been built there
    (a silent fallback would make the speed figures in bench/README.md untrue)."""
    if os.environ.get("FILTERD_PURE_PYTHON", "") not in ("", "0"):
        pytest.skip("FILTERD_PURE_PYTHON is set")
    assert tk.SPEEDUPS, "filterd/bayes/_speedups.c was not built: pip install -e . needs gcc " \
                        "and python3-dev"


def test_filterd_pure_python_turns_the_c_splitter_off():
    code = "from filterd.bayes import tokenizer as t; print(t.SPEEDUPS, t._split_words.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FILTERD_PURE_PYTHON": "1"}).stdout.split()
    assert out == ["False", "_split_words_py"]


@needs_c
@pytest.mark.parametrize("text", [
    "", "   ", "ab", "abc", "ABC def GHI", "x" * 20, "x" * 21, "ü" * 21 + " " + "ü" * 20,
    "'$%.@-_abc'.@-", "--abc--", "_abc_", "a_b_c", "don't it's 'quoted' $100 50%",
    "bob@example.com e-mail www.example.com...", "café naïve wörter-mit-umlaut 'ÉLAN' 50€ £5",
    "“smart quotes” «guillemets» — dash", "İstanbul ΟΔΟΣ ǅungla ﬁne", "日本語のテキスト 中文",
    "no\u00a0break\u2003em\u3000ideo\x85nel\x1cfs", "lone\ud800surrogate\udfffhere",
    "emoji😀inside words😀", "a" * 300 + " " + "b.c" * 100, "x@y" * 30,
])
def test_c_and_python_split_the_same_words(text):
    c, py = both(text)
    assert c == py


@needs_c
def test_c_and_python_agree_on_random_text():
    rng = random.Random(20261129)
    for _ in range(20000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 60)))
        if rng.random() < 0.1:
            text *= rng.randint(2, 8)
        c, py = both(text)
        assert c == py, repr(text)


def _both_passes(name: str, text: str) -> tuple[set, set]:
    """The tokens that tokenizer's ``<name>_c`` and ``<name>_py`` add for ``text``."""
    c, py = set(), set()
    getattr(tk, f"{name}_c")(text, c)
    getattr(tk, f"{name}_py")(text, py)
    return c, py


def _same_either_way(name: str, texts, *args) -> list:
    """Assert that tokenizer's ``<name>_c`` and ``<name>_py`` give the same for each of
    ``texts`` (``args`` after the text); returns the C results."""
    out = []
    for text in texts:
        c = getattr(tk, f"{name}_c")(text, *args)
        assert c == getattr(tk, f"{name}_py")(text, *args), repr(text)
        out.append(c)
    return out


def _random_texts(seed: int, pieces: list[str], count: int, longest: int):
    """``count`` texts of 1 to ``longest`` pieces chosen at random (the same every run)."""
    rng = random.Random(seed)
    for _ in range(count):
        yield "".join(rng.choice(pieces) for _ in range(rng.randrange(1, longest)))


@needs_c
@pytest.mark.parametrize("clause", [
    "from mail.example.co.uk (mail.example.co.uk [192.0.2.77])",
    "from [10.1.2.3] (helo=x) (HELO smtp.evil.com.br) (dsl-1-2.pool.net.example.org [(1.2.3.4)])",
    "from a.b.c.d.e.f.g.h.i.j.example.com (x.y [1.2.3.4.5]) ([٣.١.٢.٤]) (1.2.3.4)",
    "from -bad.example.com (ok-1.example.com) (a..b.com) (x.example.c0m) (X.Example.Com)",
    "from h1.one.com h2.two.net h3.three.org h4.four.io h5.five.de h6.six.fr",
    "from q.example.com/smtp.z.example.net=foo@bar.example.org;w.example.ac.jp,x.co.nz",
    "from [1.2.3.4] [5.6.7.8] [9.10.11.12] [1234.5.6.7] [1.2.3] [.1.2.3.4]",
    "", "no dots here at all", "from ..... ([]) (()) .com", "from é.example.com ü.de",
])
def test_received_clauses_give_the_same_tokens_either_way(clause):
    c, py = _both_passes("_received_words", clause.lower())
    assert c == py


@needs_c
def test_c_and_python_agree_on_random_received_clauses():
    pieces = ["a", "b", "xy", "com", "co", "uk", "net", "ac", "9", "12", "255", "1234", "-",
              ".", ".", ".", "[", "]", "(", ")", "<", ">", ";", ",", "=", "@", "/", " ", "\t",
              "é", "٣", "\u00a0", "x" * 30, "y" * 70, "_"]
    for text in _random_texts(20261129, pieces, 3000, 40):
        c, py = _both_passes("_received_words", text)
        assert c == py, text


@needs_c
@pytest.mark.parametrize("url", [
    "http://www.example.co.uk/path/to/page.html?x=1&y=2#frag",
    "www.example.com", "www.", "https://user:pw@host.example.net:8080/a/b", "ftp://[::1]/x",
    "http://192.0.2.1/cgi-bin/x.cgi", "http://[10.0.0.1]:80/", "http://a@b@c.example.org/q",
    "http://example.com./", "http://[.]/x", "http://a]./", "http:///x", "mailto:x@y",
    "http://" + "h" * 120 + ".com/", "http://x.example.com/" + "seg/" * 100,
    "http://x.example.com/12345/٣٤٥/²³⁴/abc_def%20ghi-jkl+mno",
    "https://ünïcode.example.jp/päth/wörter", "abcdefghijklmnop://host/x", "http://h/a/b/c",
])
def test_urls_give_the_same_tokens_either_way(url):
    c, py = _both_passes("_url_words", url)
    assert c == py


@needs_c
def test_c_and_python_agree_on_random_urls():
    pieces = ["http://", "https://", "www.", "://", "a", "bc", "com", "co", "uk", ".", ".",
              "/", "/", "?", "#", "@", ":", "8080", "[", "]", "1", "22", "333", "4444", "&",
              "=", "+", "_", "%", "-", "ü", "٣", "²", "x" * 25, "abcdefghij"]
    for url in _random_texts(20261130, pieces, 5000, 30):
        c, py = _both_passes("_url_words", url)
        assert c == py, url


@needs_c
def test_header_shapes_are_the_same_either_way():
    rng = random.Random(20261129)
    samples = ["<20021008.A1b2@x>", "Tue, 8 Oct 2002 12:00:00 +0200 (CEST)", "", "aaa999AAA",
               "é日本\ud800\U0001F600x", "\x00\x7f 9a", "a" * 300, "Ab" * 200]
    samples += ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 40)))
                for _ in range(3000)]
    _same_either_way("_shape", samples)


@needs_c
def test_html_tag_names_and_texts_are_found_the_same_either_way():
    texts = ["", "<", "<>", "<b>", "< \n\tb x=1>", "<b_>", "<bé>", "<b1>", "<1b>",
             "<abcdefghijklmnop>", "<abcdefghijklmnopq>", "<a\u00a0href=x>", "<a href='x'",
             "<a " + "x" * 2000 + ">", "<a " + "x" * 2001 + ">", "<p><p><p>", "<a>\0<b>",
             "<a><ü>", "<a" + ">" * 3]
    pieces = ["<", ">", " ", "\n", "a", "b", "z", "1", "9", "_", "é", "=", "'", "\u00a0",
              "abcdefgh", "x" * 300, "\u3000"]
    texts += _random_texts(13, pieces, 4000, 30)
    texts.append("<b>" * 6000)  # the first 5,000 tags only
    _same_either_way("_tag_parts", texts)
    assert tk._tag_parts_c("<b>" * 6000)[1] == "\0" * 4999
    with pytest.raises(TypeError):
        tk._tag_parts_c(b"<b>")


@needs_c
def test_html_is_stripped_of_scripts_comments_and_tags_the_same_either_way():
    texts = ["", "<", ">", "<>", "a<b>c", "<b", "x<script>var a='<b>';</script>y",
             "<SCRIPT>a</script>b</SCRIPT >c", "<Script>a</Script\n\t>b", "<scripts>x</scripts>",
             "<script_>x</script_>", "<scripté>x</scripté>", "<style>p{}</style\u2003>q",
             "<!---->", "<!-->", "<!-- a -- b -->c<!-- d", "<!-- x", "a<!--b-->c<d>e",
             "<script>no end", "<style>", "<scr<b>ipt>", "<script>a</script", "<p\nclass=x>t</p>",
             "<a href='x>y'>z</a>", "ü<ü>ü", "日本<b>語</b>", "😀<i>😀</i>", "<<>>", "<script>"]
    pieces = ["<", ">", "/", "!", "--", "-", "script", "SCRIPT", "Script", "style", "STYLE",
              "</", "</script", "</style", " ", "\n", "\t", "\u2003", "a", "b", "_", "é", "=",
              "'", '"', "p", "语"]
    texts += _random_texts(12, pieces, 4000, 25)
    for got, text in zip(_same_either_way("_strip_tags", texts), texts):
        assert got == text or "<" in text
    with pytest.raises(TypeError):
        tk._strip_tags_c(b"<b>")


@needs_c
def test_folded_header_blocks_are_unfolded_the_same_either_way():
    texts = ["", "a", "\n", "\n ", " \n", "\n\t\t x", "a\n b\n\tc\n\n d", "a\r\n b",
             "Subject: x\n  \t y\nTo: z\n", "ü\n  ü", "日本\n\t語", "😀\n 😀\n", "\n \n \n"]
    texts += _random_texts(11, ["\n", " ", "\t", "\r", "a", "Ü", "語", "😀", ": "], 500, 30)
    for got, text in zip(_same_either_way("_unfold", texts), texts):
        assert got == text or len(got) < len(text)  # (same object kind: equal compares work)
        assert got.isascii() == text.isascii()
    with pytest.raises(TypeError):
        tk._unfold_c(b"bytes")


@needs_c
def test_header_lines_are_the_same_either_way():
    samples = ["Subject: hi\nFrom:  a@b  \n", "", "\n", "no colon here\nX-A :v\nX-B\t:\tw\n",
               "N" * 80 + ": exactly 80\n" + "M" * 81 + ": too long\nok: 1", ":empty name\n",
               "Bad Name: v\nGood-Name: v \u3000\nx:\r\ny: \x85v\x85\n\n\nz:last",
               "é: not ascii\na\x7f: del\n~!: sym"]
    pieces = ["A", "b", "-", ":", " ", "\t", "\n", "\n", "é", "\r", "x" * 79, "\x00", "~",
              "\u00a0", "=?"]
    samples += list(_random_texts(20261131, pieces, 3000, 30))
    _same_either_way("_header_lines", samples, 120)
    many = "".join(f"h{i}: {i}\n" for i in range(200))
    assert len(_same_either_way("_header_lines", [many], 120)[0]) == 120
    assert _same_either_way("_header_lines", ["Content-TYPE: Text/HTML\n"], 9)[0] == [
        ("content-type", "Text/HTML")]  # names in lower case, values as written


@needs_c
def test_html_attribute_names_are_the_same_either_way():
    samples = [' href="x" src = y  data-id=1 -x=2 a=3 abcdefghijklmnopqrstu=4 '
               'abcdefghijklmnopqrstuv=5 x y= \0 z=6 é=7 ÿa=8 \u3000b=9', "", "=", " =", " a="]
    pieces = [" ", "\t", "\n", "\u00a0", "\u3000", "=", "a", "Z", "-", "x" * 20, "é", '"',
              "\0", "1"]
    samples += list(_random_texts(20261132, pieces, 5000, 25))
    _same_either_way("_attr_names", samples)


@needs_c
def test_addresses_are_the_same_either_way():
    long = "l" * 70
    samples = ['"Bob" <bob.smith+tag@mail.example.co.uk>, alice@example.org', "", "@", "a@",
               "@b", f"{long}@example.com", "a@" + "d" * 70 + "@c.example",
               "x@a.b.c.d.e.f.g.h.i.j.k",
               "a@b..c x@-y.z o'neil=x@host_1.example é@ü.example ٣@٤ a@b.", "a@@b a@b@c",
               "user@" + ".".join(["l" * 63] * 3) + ".x" * 3, "q@w" + "." * 5]
    pieces = ["a", "Z", "1", "_", ".", "+", "'", "=", "-", "@", "@", " ", "<", ">", ",", "é",
              "٣", "x" * 30, "y" * 63, "\u00a0"]
    samples += list(_random_texts(20261133, pieces, 5000, 25))
    _same_either_way("_addresses", samples, 50)
    many = ", ".join(f"u{i}@h{i}.example" for i in range(80))
    assert len(_same_either_way("_addresses", [many], 50)[0]) == 50


@needs_c
def test_header_tokens_are_the_same_either_way():
    """The C pass over the header fields gives the Python one's tokens: every selected header
    and some others, encoded words, addresses or none, Message-IDs with and without "@",
    blank and odd dates, subjects in capitals or not, values past 4,000 characters and more
    than six Received fields."""
    names = sorted(tk._SELECTED) + ["x-other", "comments"]
    values = ["", " ", "Mon, 2 Dec 2002 10:00:00 +0100", "=?utf-8?b?SMOpbGxv?= world",
              "=?iso-2022-jp?B?GyRCJUYlOSVIGyhC?=", "=?x?q?a?=" * 12, "Bob <bob@Example.COM>",
              "a@b, C@D.example, <e@f.example>", "<20021008.a1B@mail.Example.co.uk>",
              "<no-at-sign>", "<@>", "a@b@c", "HELLO WORLD!!", "123 456", "ÉTÉ", "Ünïcode ☃",
              'text/HTML; charset="ISO-8859-1"', "multipart/mixed;boundary=x", " BASE64 ",
              "from mx.example.org ([192.0.2.1]) by gw.example; Mon", "x" * 5000 + "@y.example",
              "　 ", "Name (comment) <n@m.example>; other@x"]
    rng = random.Random(20261130)
    cases = [[(n, v)] for n in names for v in values]
    cases += [[("received", v) for v in values[:9]]]  # more than six Received fields
    for _ in range(3000):
        cases.append([(rng.choice(names), rng.choice(values) + rng.choice(["", " ", "@x.y"]))
                      for _ in range(rng.randrange(0, 12))])
    for headers in cases:
        c, py = set(), set()
        tk._header_tokens_c(headers, c)
        tk._header_tokens_py(headers, py)
        assert c == py, headers
    with pytest.raises(TypeError):
        tk._header_tokens_c([("subject", b"bytes")], set())
    with pytest.raises(TypeError):
        tk._header_tokens_c(("not", "a list"), set())


@needs_c
def test_linear_steps_are_the_same_either_way():
    """A PA-I step in C gives the Python one's changes and leaves the same weights: margins
    short of 1 and past it, with Fisher's offset or without, no tokens, steps capped by C,
    rounding half to even, weights near the 32-bit limits (saturating), tokens given as
    buckets or as 32-bit hashes (a hash steps its low bits' bucket); wrong arguments are
    errors."""
    from array import array

    from filterd.bayes import linear

    rng = random.Random(20261130)
    weights = linear.zeros()
    for i in range(0, linear.BUCKETS, 5):
        weights[i] = rng.randrange(-3000, 3000)
    weights[7] = (1 << 31) - 10
    weights[8] = -(1 << 31) + 10
    cases = [(array("I"), 0, True, 1.0, 0.0), (array("I", [7, 8, 7]), 0, True, 1.0, 0.5),
             (array("I", [7, 8]), 0, False, 1.0, 0.0)]
    for _ in range(3000):
        n = rng.choice([1, 2, 3, 50, 200, 1000])
        top = rng.choice([linear.BUCKETS, 1 << 32])
        bk = array("I", (rng.randrange(top) for _ in range(n)))
        cases.append((bk, rng.randrange(-3_000_000, 3_000_000), rng.random() < 0.5,
                      rng.choice([1.0, 0.5, 0.01, 1e-7]),
                      rng.choice([0.0, 0.0, rng.uniform(-1, 1), 1.0, -1.0])))
    c_w, py_w = array("i", weights), array("i", weights)
    for bk, bias, spam, c, off in cases:
        got = linear._c.linear_step(c_w, bk, bias, spam, c, off)
        want = linear._step_py(py_w, bk, bias, spam, c, off)
        assert got == want, (len(bk), bias, spam, c, off)
    assert c_w == py_w and c_w != weights  # (steps were taken)
    # without an offset: 0; a hash steps the bucket of its low bits
    w1, w2 = linear.zeros(), linear.zeros()
    assert linear._c.linear_step(w1, array("I", [5 + linear.BUCKETS * 7]), 0, True, 1.0) \
        == linear._c.linear_step(w2, array("I", [5]), 0, True, 1.0, 0.0)
    assert w1 == w2 and w1[5] > 0
    with pytest.raises(TypeError):
        linear._c.linear_step(c_w, [1, 2], 0, True, 1.0)  # not an array('I')
    with pytest.raises(ValueError):
        linear._c.linear_step(array("i", [0]), array("I", [0]), 0, True, 1.0)
    with pytest.raises(TypeError):
        linear._c.linear_step(c_w, array("I", [1]), 0, True, 1.0, "offset")


def _all_tokens(raw: bytes, path: str) -> set[str]:
    """tokenize(raw) with the C (``path="c"``) or the Python (``"py"``) word splitter and its
    Received clause, URL, header shape, header line, HTML attribute and address passes."""
    names = ("_split_words", "_received_words", "_url_words",
             "_shape", "_unfold", "_strip_tags", "_tag_parts", "_header_lines", "_attr_names",
             "_addresses", "_header_tokens")
    saved = [getattr(tk, n) for n in names]
    for n in names:
        setattr(tk, n, getattr(tk, f"{n}_{path}"))
    try:
        return tk.tokenize(raw)
    finally:
        for n, fn in zip(names, saved):
            setattr(tk, n, fn)


def _messages(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.startswith(("LICENSE", "README", "COPYING")):
            yield p


@needs_c
def test_every_test_message_gives_the_same_tokens_either_way():
    files = list(_messages(DATA))
    assert len(files) > 100
    for p in files:
        raw = p.read_bytes()
        assert _all_tokens(raw, "c") == _all_tokens(raw, "py"), p


@needs_c
@pytest.mark.skipif(not CORPUS.is_dir(), reason="SpamAssassin corpus not next to the checkout")
def test_the_spamassassin_corpus_gives_the_same_tokens_either_way():
    files = list(_messages(CORPUS))
    for p in files:
        raw = p.read_bytes()
        assert _all_tokens(raw, "c") == _all_tokens(raw, "py"), p


# -- the classifier's pass over a message's tokens ------------------------------------------------
@needs_c
def test_the_classifiers_token_pass_finds_the_same_either_way():
    from filterd.bayes import engine

    rng = random.Random(20261130)
    cache = {}
    for i in range(3000):
        f, r = rng.random(), rng.random()
        w = rng.randrange(-(1 << 31), 1 << 31)
        cache[f"t{i}"] = (None if r < 0.3 else w if r < 0.5
                          else engine.ENTRY.pack(f, rng.uniform(-20, 0), -rng.random(), w))
    tokens = {f"t{rng.randrange(6000)}" for _ in range(800)} | {"", "cs:Ü", "t0"}
    c_missing, c_logs, c_w = engine._speedups.cached_logs(cache, tokens)
    py_missing, py_logs, py_w = engine._cached_logs_py(cache, tokens)
    assert sorted(c_missing) == sorted(py_missing) == sorted(t for t in tokens if t not in cache)
    # the same logarithms, pair by pair (the order follows the set's, which both walk alike)
    assert c_logs == py_logs
    entries = [engine.ENTRY.unpack(v) for v in map(cache.get, tokens) if isinstance(v, bytes)]
    assert c_logs == b"".join(engine._PAIR.pack(e[1], e[2]) for e in entries)
    # the weights of every learned token (with evidence or not), beyond 32 bits in sum
    assert c_w == py_w == sum(v if isinstance(v, int) else engine.ENTRY.unpack(v)[3]
                              for v in map(cache.get, tokens) if v is not None)
    assert engine._speedups.cached_logs({}, set()) == ([], b"", 0)
    with pytest.raises(TypeError):
        engine._speedups.cached_logs({"t": (0.5, 1.0, 2.0, 3)}, {"t"})  # not an entry
    with pytest.raises(TypeError):
        engine._speedups.cached_logs({"t": b"short"}, {"t"})
    with pytest.raises(TypeError):
        engine._speedups.cached_logs([], {"t"})


@needs_c
def test_looked_up_tokens_get_the_same_bits_either_way():
    """f(w) and its logarithms from the C pass equal classifier.probabilities' to the bit, for
    counts from never-learned to huge, including the ones filtered out (too weak, or seen
    fewer than min_count times) and f clamped at 1e-9 / 1 - 1e-9; every learned token gets its
    bucket's linear weight (0 without weights), and both return the same sum of them."""
    from filterd.bayes import engine, linear

    rng = random.Random(20261129)
    packed = {"zero": 0, "ham1": 1, "spam1": 1 << 32, "even": (7 << 32) | 7,
              "huge": (2_000_000_000 << 32) | 3, "clamp-hi": 10**9 << 32, "clamp-lo": 10**9}
    for i in range(4000):
        packed[f"t{i}"] = (rng.choice([0, 1, 2, rng.randrange(1000)]) << 32) \
            | rng.choice([0, 1, 3, rng.randrange(5000)])
    missing = list(packed) + [f"never{i}" for i in range(50)]
    weights = linear.zeros()
    for i in range(0, linear.BUCKETS, 3):
        weights[i] = rng.randrange(-(1 << 31), 1 << 31)
    for args, w in [((1200, 2500, 0.0178, 0.52, 0.2, 0), weights),
                    ((1, 1, 0.5, 0.4, 0.0, 3), None), ((97, 10**6, 1.0, 0.5, 0.45, 1), weights)]:
        out = []
        for fn in (engine._speedups.token_logs, engine._token_logs_py):
            cache = {"kept": None}
            logs, total = fn(cache, missing, packed, *args, w)
            out.append((cache, logs, total))
        assert out[0] == out[1]  # (the logarithms too, in the same order: packed's)
        assert list(out[0][0]) == list(out[1][0])  # the same tokens in the same order
        cache, logs = out[0][0], out[0][1]
        entries = {t: engine.ENTRY.unpack(v) for t, v in cache.items() if isinstance(v, bytes)}
        assert 0 < len(entries) < len(packed)
        assert logs == b"".join(engine._PAIR.pack(e[1], e[2]) for e in entries.values())
        assert all(cache[t] is None for t in missing if t not in packed)
        want = [weights[b] if w is not None else 0 for b in linear.buckets(list(packed))]
        assert [v if isinstance(v, int) else engine.ENTRY.unpack(v)[3]
                for v in map(cache.get, packed)] == want
        assert out[0][2] == sum(want)
    cache = {}
    assert engine._speedups.token_logs(cache, ["a", "b"], {}, 5, 5, 0.1, 0.5, 0.1, 0,
                                       None) == (b"", 0)
    assert cache == {"a": None, "b": None}
    with pytest.raises(ValueError):  # counts that cannot be packed spam << 32 | ham
        engine._speedups.token_logs({}, ["a"], {"a": 1 << 70}, 5, 5, 0.1, 0.5, 0.1, 0, None)
    with pytest.raises(TypeError):
        engine._speedups.token_logs({}, ["a"], {"a": "7"}, 5, 5, 0.1, 0.5, 0.1, 0, None)
    with pytest.raises(TypeError):
        engine._speedups.token_logs({}, [], [], 5, 5, 0.1, 0.5, 0.1, 0, None)
    with pytest.raises(ValueError):  # weights of another size
        engine._speedups.token_logs({}, ["a"], {"a": 1}, 5, 5, 0.1, 0.5, 0.1, 0, bytes(16))


@needs_c
def test_linear_buckets_are_the_same_either_way():
    """A token's bucket from the C extension equals linear._bucket_py's, for ASCII, other
    scripts, lone surrogates, the empty token and lengths around the 8-byte words."""
    from filterd.bayes import linear

    rng = random.Random(20261130)
    alphabet = string.ascii_letters + "éü€日本😀\udcff"
    toks = ["", "a", "abcdefgh", "abcdefghi", "x" * 64] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(20000)]
    got = linear.buckets(toks)
    assert got == linear._buckets_py(toks)
    assert all(0 <= b < linear.BUCKETS for b in got)
    assert len(set(got)) > 0.9 * len(set(toks))  # spread over the buckets
    # the 32-bit hashes bulk training keeps: the same either way, their low bits the buckets
    hashes = linear.buckets(toks, linear.HASH_MASK)
    assert hashes == linear._buckets_py(toks, linear.HASH_MASK)
    assert list(linear.hashes(toks)) == hashes
    assert [h & linear.MASK for h in hashes] == got
    assert max(hashes) >= 1 << 31 and len(set(hashes)) == len(set(toks))
    with pytest.raises(TypeError):
        linear.buckets([b"bytes"])
    with pytest.raises(ValueError):
        linear.buckets(["a"], 1 << 32)


@needs_c
def test_fishers_combination_gives_the_same_bits_either_way():
    """The C combination (exact sums, the chi-square tail) equals combine_logs over
    math.fsum to the bit: for no tokens, one, many, more than n_eff, sums whose rounding
    math.fsum corrects across partials, and probabilities near both ends."""
    import math

    from filterd.bayes import engine

    rng = random.Random(20261130)
    cases = [([], []), ([-1e-9], [-20.7]), ([1e-16, 1.0, 1e16], [-1e16, 1.0, -1e-16])]
    for n in (1, 2, 3, 49, 50, 51, 183, 1000, 4000):
        for skew in (1, 3, 12):
            f = [min(max(rng.random() ** skew, 1e-9), 1 - 1e-9) for _ in range(n)]
            cases.append(([math.log(x) for x in f], [math.log(1.0 - x) for x in f]))
    def packed(log_f, log_1f, cut):  # the pairs, in one part or cut in two
        data = b"".join(engine._PAIR.pack(a, b) for a, b in zip(log_f, log_1f))
        at = engine._PAIR.size * (len(log_f) // 3) if cut else len(data)
        return [data[:at], data[at:]]

    for log_f, log_1f in cases:
        for n_eff in (0, 1, 5, 50, 10_000):
            for cut in (False, True):
                parts = packed(log_f, log_1f, cut)
                c = engine._fisher(parts, n_eff)
                assert c == engine._fisher_py(parts, n_eff), (len(log_f), n_eff)
                assert 0.0 <= c[0] <= 1.0 and c[3] == len(log_f)
                want = engine.combine_logs(math.fsum(log_f), math.fsum(log_1f), len(log_f),
                                           n_eff)
                assert c == (want.probability, want.spam_evidence, want.ham_evidence,
                             want.tokens_used)
    assert engine._fisher([b""], 50) == engine._fisher([], 50) == (0.5, 0.0, 0.0, 0)
    with pytest.raises(TypeError):  # not whole pairs
        engine._fisher([bytes(8)], 50)
    with pytest.raises(ValueError):  # not a finite logarithm
        engine._fisher(packed([float("-inf")], [-1.0], False), 50)
    with pytest.raises(TypeError):
        engine._fisher([[-1.0, -1.0]], 50)


@needs_c
def test_the_presence_filter_sets_and_finds_the_same_bits_either_way():
    """presence_positions and presence_filter in C agree with the Python ones (zlib's CRC-32)
    on ASCII, other scripts, lone surrogates and the empty token; a learned token always
    passes, and so do very few others; a copy of the filter spares the tokens it holds."""
    from filterd.bayes import presence

    rng = random.Random(20261130)
    learned = [f"t{rng.random()}" for _ in range(20000)] + ["", "cs:Ü", "subj:日本語", "x\udcff"]
    positions = presence._c.presence_positions(learned)
    assert positions == presence._positions_py(learned) and len(positions) == 4 * len(learned)
    assert len({n >> 9 for n in positions[:4]}) == 1  # a token's bits: in one 512-bit block
    bitmap = bytearray(presence.PRESENCE_BYTES)
    presence.set_bits(bitmap, positions)
    probe = learned[::7] + [f"n{rng.random()}" for _ in range(100_000)] + ["ü" * 40]
    kept = presence._c.presence_filter(bitmap, probe)
    assert kept == presence._filter_py(bitmap, probe) == presence._filter_py(bytes(bitmap), probe)
    assert kept[:len(learned[::7])] == learned[::7]
    assert len(kept) - len(learned[::7]) < 20  # false positives: about 1 in 10**5 here
    more = learned[:50] + [f"new{i}" for i in range(50)]
    for known in (bitmap, bytes(bitmap)):
        assert (presence._c.presence_positions(more, known)
                == presence._positions_py(more, known) == presence._positions_py(more[50:]))
    for fn in (presence._c.presence_filter, presence._filter_py):
        with pytest.raises(TypeError):
            fn(bitmap[:100], ["t"])
        with pytest.raises(TypeError):
            fn(bitmap, ("t",))  # a list
    for fn in (presence._c.presence_positions, presence._positions_py):
        with pytest.raises(TypeError):
            fn(["t"], bitmap[:100])
    with pytest.raises(TypeError):
        presence._c.presence_positions(["t", b"bytes"])


@needs_c
def test_classification_is_bit_identical_with_either_token_pass(tmp_path, monkeypatch):
    """Trained on half of the test messages, every message gets exactly the same probability
    from the C passes and the Python ones (the sums are exact, so order does not matter)."""
    import asyncio

    from filterd.bayes import engine
    from filterd.store.sqlite import SQLiteStore

    files = list(_messages(DATA))
    raws = [p.read_bytes() for p in files]

    async def run(pass_fn, logs_fn, fisher_fn):
        monkeypatch.setattr(engine, "_cached_logs", pass_fn)
        monkeypatch.setattr(engine, "_token_logs", logs_fn)
        monkeypatch.setattr(engine, "_fisher", fisher_fn)
        store = SQLiteStore(tmp_path / f"{pass_fn.__name__}.sqlite")
        bayes = engine.Bayes(store)
        await bayes.learn(raws[0:len(raws) // 2:2], spam=True)
        await bayes.learn(raws[1:len(raws) // 2:2], spam=False)
        out = [(await bayes.classify(r)).probability for r in raws]
        out += [(await bayes.classify(r)).probability for r in raws]  # cache warm
        await store.close()
        return out

    c = asyncio.run(run(engine._speedups.cached_logs, engine._speedups.token_logs,
                        engine._fisher))
    py = asyncio.run(run(engine._cached_logs_py, engine._token_logs_py, engine._fisher_py))
    assert c == py
    assert len({round(p, 6) for p in c}) > 10  # the messages really were told apart
