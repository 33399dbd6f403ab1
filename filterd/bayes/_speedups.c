/* The Bayes tokenizer's word splitter in C: filterd.bayes._speedups.split_words, the
 * tokenizer's other passes, the classifier's pass over a message's tokens
 * (cached_logs, token_logs, fisher), the presence filter of learned tokens
 * (presence_positions, presence_filter) and the linear model's buckets and step
 * (linear_buckets, linear_step).
 *
 * It does exactly what the pure-Python path of filterd/bayes/tokenizer.py (_split_words_py)
 * does, in one pass over the text instead of a chain of copies (encode, translate, decode,
 * split, set) and a Python loop over the distinct pieces. tests/test_bayes_speedups.py checks
 * that both give the same result on every message under tests/data and on random text.
 *
 * split_words(findall, text) -> (words, long, cjk)
 *   A chunk is a maximal run of characters that are not separators. Separators: ASCII
 *   characters other than letters, digits and _ ' $ % . @ -; lone surrogates (the Python path
 *   encodes them to '?', which is then a separator); and Unicode white space (str.split()).
 *   words: set of the distinct chunks of 3..20 characters that are all alphanumeric
 *   (str.isalnum()), plus, from every other distinct chunk of at least 3 characters, the pieces
 *   of 3..20 characters; long: list of the pieces of more than 20 characters (one entry per
 *   distinct chunk it came from, in no particular order). The pieces of an ASCII chunk: the
 *   chunk with ' $ % . @ - _ stripped from its start and ' . @ - from its end; of a chunk with
 *   other characters: findall(chunk) (the tokenizer's word pattern, applied in Python).
 *   cjk: whether the text holds a character of the tokenizer's CJK ranges (_CJK_RE): when
 *   not, its search for CJK runs can be skipped.
 *
 * cached_logs(cache, tokens) -> (missing, logs, weights)
 *   The classifier's one pass over a message's tokens (filterd/bayes/engine.py): cache maps a
 *   token to an entry (engine.ENTRY: f, ln f, ln(1 - f) and its linear weight, packed), to its
 *   weight alone (learned, no evidence) or to None (never learned). missing: the tokens not in
 *   cache (to be looked up); logs: the (ln f, ln(1 - f)) pairs of the cached tokens with
 *   evidence as packed doubles, in the order met; weights: the sum of the cached tokens'
 *   weights. The same as engine._cached_logs_py.
 *
 * received_words(sld, low, out) -> None
 *   The tokenizer's look at the from clause of one Received header (low: lower-cased, cut
 *   before " by "): for each white-space separated word holding a dot, "rcvd:ip:A.B.C" for a
 *   bracketed IPv4 address (at most 2), else "rcvd:" + the registrable domain of each host name
 *   among its pieces (at most 4 words' worth; sld: the second-level labels of
 *   tokenizer._SLD), added to out. The same as tokenizer._received_words_py.
 *
 * url_words(sld, url, out) -> None
 *   The tokens of one URL (stripped and lower-cased): url:scheme:, url:userinfo, url:port,
 *   url:ip or url:longhost, else url:host:, url:dom: (its registrable domain) and url:p: path
 *   words, added to out. The same as tokenizer._url_words_py.
 *
 * shape(text) -> str
 *   A header's format with its content taken out: each run of digits becomes 9, of lower-case
 *   ASCII letters a, of capitals A; other non-ASCII characters ?. The same as
 *   tokenizer._shape_py.
 *
 * tag_parts(lower) -> (names, texts)
 *   The first 5,000 matches of tokenizer._TAG_RE (a "<", blanks, a name of an ASCII letter and
 *   up to 15 more letters or digits ending at a non-word character, then up to 2,000
 *   characters before the next ">") without the pattern: the set of the names, and the texts
 *   after them joined with NULs. The same as tokenizer._tag_parts_py.
 *
 * strip_tags(markup) -> str
 *   tokenizer._STRIP_RE.sub(" ", markup) without the pattern: at each "<", a script or style
 *   element (the name in any case, then no word character, then the first "</" + the name as
 *   written there + blanks + ">"), else a comment ("<!--" to the first "-->"), else a tag ("<"
 *   to the first ">") is replaced by one space. The same as tokenizer._strip_tags_py.
 *
 * unfold(text) -> str
 *   Each line break followed by blanks (tokenizer._UNFOLD_RE, "\n[ \t]+") replaced by one
 *   space, in one pass: the continuation lines of a header block joined to their lines. The
 *   same as tokenizer._unfold_py.
 *
 * header_lines(text, most) -> list of (name, value)
 *   The `name: value` lines of an unfolded header block (LF line ends), at most `most`: a
 *   name is 1-80 printable ASCII characters other than the colon (given in lower case), blanks
 *   may come before the colon, the value is the rest of the line, stripped. Other lines are
 *   skipped. The same as tokenizer._header_lines_py.
 *
 * attr_names(text) -> set
 *   The names of tokenizer._ATTR_RE (a blank, a name of an ASCII letter and up to 20 more
 *   letters or hyphens, blanks, "="): found from each "=" backwards instead of trying the
 *   pattern at every blank. The same set as tokenizer._attr_names_py.
 *
 * addresses(text, most) -> list of (local, domain)
 *   tokenizer._ADDR_RE.findall(text)[:most], found from each "@" instead of trying the
 *   pattern at every word character. The same as tokenizer._addresses_py.
 *
 * presence_positions(tokens, known=None) -> list
 * presence_filter(bitmap, tokens) -> list
 *   The presence filter of learned tokens (filterd/bayes/presence.py): a Bloom filter of
 *   PRESENCE_BITS bits in which a token sets 4 bits inside one 512-bit block, chosen by the
 *   CRC-32 of its UTF-8 bytes (zlib's) and the CRC-32 of those bytes reversed.
 *   presence_positions gives the numbers of the tokens' bits, 4 per token, leaving out the
 *   tokens whose bits are all set in known (a copy of the filter read before: they need no
 *   write). presence_filter keeps the tokens whose 4 bits are all set in bitmap, in their
 *   order. A filter is PRESENCE_BITS / 8 bytes (bytes or a bytearray); bit n is byte n >> 3,
 *   mask 0x80 >> (n & 7), as Redis numbers them. The same as presence._positions_py and
 *   _filter_py.
 *
 * fisher(lgamma, parts, n_eff) -> (probability, spam_evidence, ham_evidence, n)
 *   Fisher's combination of the (ln f, ln(1 - f)) pairs the two passes collected (parts:
 *   their packed doubles): classifier.combine_logs(math.fsum of the ln f, math.fsum of the
 *   ln(1 - f), the number of pairs, n_eff), as a tuple. The sums are exact (Shewchuk's partials, as math.fsum: a correctly rounded sum
 *   is one number, so both give the same bits) and the chi-square tail is
 *   classifier._chi2q_log operation for operation, with lgamma the Python math.lgamma (whose
 *   own bits the C library's need not match). The same as engine._fisher_py.
 *
 * token_logs(cache, missing, packed, nspam, nham, robs, robx, min_dev, min_count,
 *            weights) -> (logs, weights)
 *   The rest of that pass, for the tokens that were looked up: every token of missing goes
 *   into cache as None (never learned), then every learned one of them (packed: token ->
 *   counts packed as spam << 32 | ham) as its entry when it says something, else as its
 *   weight alone (weights: the linear model's array, or None: 0); returns the entries' (ln f,
 *   ln(1 - f)) pairs as packed doubles and the sum of the learned tokens' weights. f is
 *   Robinson's f(w), computed in the same operations and order as classifier.probabilities,
 *   so that both give the same bits. The same as engine._token_logs_py.
 *
 * header_tokens(codes, helpers, headers, out) -> None
 *   The tokens of the selected header fields, the same as tokenizer._header_tokens_py.
 *
 * linear_buckets(tokens, mask) -> list; linear_step(weights, buckets, bias, spam, c, offset)
 *   -> (dw, db)
 *   The linear model's bucket (or 32-bit hash) of each token and one PA-I step
 *   (filterd/bayes/linear.py), the same as linear._buckets_py and linear._step_py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MIN_WORD 3
#define MAX_WORD 20

/* ASCII classes: 1 = letter or digit, 2 = other word character (_ ' $ % . @ -), 0 = separator */
static unsigned char ascii_class[128];

static PyObject *WWW, *SCHEME_SEP;  /* "www.", "://" */

static void init_tables(void)
{
    for (int c = 0; c < 128; c++) {
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
            ascii_class[c] = 1;
        else if (c == '_' || c == '\'' || c == '$' || c == '%' || c == '.' || c == '@' || c == '-')
            ascii_class[c] = 2;
        else
            ascii_class[c] = 0;
    }
}

static inline int is_separator(Py_UCS4 ch)
{
    if (ch < 128)
        return ascii_class[ch] == 0;
    if (ch >= 0xD800 && ch <= 0xDFFF)
        return 1;
    return Py_UNICODE_ISSPACE(ch);
}

static inline int is_cjk(Py_UCS4 ch)
{
    return (ch >= 0x3040 && ch <= 0x30ff) || (ch >= 0x3400 && ch <= 0x4dbf)
        || (ch >= 0x4e00 && ch <= 0x9fff) || (ch >= 0xac00 && ch <= 0xd7af)
        || (ch >= 0xf900 && ch <= 0xfaff);
}

static inline int in_set(Py_UCS4 ch, const char *chars)
{
    for (; *chars; chars++)
        if ((Py_UCS4)(unsigned char)*chars == ch)
            return 1;
    return 0;
}

/* Add a piece to words (3..20 characters) or long (more than 20). */
static int add_piece(PyObject *piece, PyObject *words, PyObject *longs)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(piece);
    if (n >= MIN_WORD && n <= MAX_WORD)
        return PySet_Add(words, piece);
    if (n > MAX_WORD)
        return PyList_Append(longs, piece);
    return 0;
}

/* A chunk that is not a plain word: its pieces (see the top of the file). */
static int other_chunk(PyObject *text, int kind, const void *data, Py_ssize_t start,
                       Py_ssize_t end, int ascii, PyObject *findall, PyObject *words,
                       PyObject *longs)
{
    if (ascii) {
        while (start < end && in_set(PyUnicode_READ(kind, data, start), "'$%.@-_"))
            start++;
        while (end > start && in_set(PyUnicode_READ(kind, data, end - 1), "'.@-"))
            end--;
        Py_ssize_t n = end - start;
        if (n < MIN_WORD)
            return 0;
        PyObject *piece = PyUnicode_Substring(text, start, end);
        if (piece == NULL)
            return -1;
        int rc = add_piece(piece, words, longs);
        Py_DECREF(piece);
        return rc;
    }
    PyObject *chunk = PyUnicode_Substring(text, start, end);
    if (chunk == NULL)
        return -1;
    PyObject *found = PyObject_CallOneArg(findall, chunk);
    Py_DECREF(chunk);
    if (found == NULL)
        return -1;
    PyObject *seq = PySequence_Fast(found, "findall must return a list");
    Py_DECREF(found);
    if (seq == NULL)
        return -1;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < m; i++) {
        if (!PyUnicode_Check(items[i])) {
            PyErr_SetString(PyExc_TypeError, "findall must return strings");
            Py_DECREF(seq);
            return -1;
        }
        if (add_piece(items[i], words, longs) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    return 0;
}

/* The next chunk of text from *pos on: returns its start (-1: none left) and leaves its end
 * in *pos; whether it is all alphanumeric (*alnum) and all ASCII (*ascii); *cjk is set when it
 * holds a CJK character. Always inlined, so that a constant kind (one byte per character, most
 * text) takes the per-character kind switch out of the loop. */
static inline __attribute__((always_inline)) Py_ssize_t
next_chunk(int kind, const void *data, Py_ssize_t len, Py_ssize_t *pos, int *alnum, int *ascii,
           int *cjk)
{
    Py_ssize_t i = *pos;
    while (i < len && is_separator(PyUnicode_READ(kind, data, i)))
        i++;
    if (i >= len) {
        *pos = i;
        return -1;
    }
    Py_ssize_t start = i;
    *alnum = *ascii = 1;
    for (; i < len; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (ch < 128) {
            unsigned char c = ascii_class[ch];
            if (c == 0)
                break;
            if (c == 2)
                *alnum = 0;
        } else {
            if (is_separator(ch))
                break;
            *ascii = 0;
            if (!*cjk && is_cjk(ch))
                *cjk = 1;
            if (*alnum && !Py_UNICODE_ISALNUM(ch))
                *alnum = 0;
        }
    }
    *pos = i;
    return start;
}

static PyObject *split_words(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "split_words(findall, text: str)");
        return NULL;
    }
    PyObject *findall = args[0], *text = args[1];
    if (PyUnicode_READY(text) < 0)
        return NULL;
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);

    PyObject *words = PySet_New(NULL);
    PyObject *longs = PyList_New(0);
    PyObject *others = PySet_New(NULL); /* distinct chunks already taken apart */
    if (words == NULL || longs == NULL || others == NULL)
        goto fail;

    int cjk = 0, alnum, ascii;
    Py_ssize_t i = 0;
    for (;;) {
        Py_ssize_t start = kind == PyUnicode_1BYTE_KIND
            ? next_chunk(PyUnicode_1BYTE_KIND, data, len, &i, &alnum, &ascii, &cjk)
            : next_chunk(kind, data, len, &i, &alnum, &ascii, &cjk);
        if (start < 0)
            break;
        Py_ssize_t n = i - start;
        if (n < MIN_WORD)
            continue;
        PyObject *chunk = PyUnicode_Substring(text, start, i);
        if (chunk == NULL)
            goto fail;
        if (alnum && n <= MAX_WORD) {
            int rc = PySet_Add(words, chunk);
            Py_DECREF(chunk);
            if (rc < 0)
                goto fail;
            continue;
        }
        int seen = PySet_Contains(others, chunk);
        if (seen == 0)
            seen = PySet_Add(others, chunk);
        else if (seen == 1) { /* this chunk's pieces are in already */
            Py_DECREF(chunk);
            continue;
        }
        Py_DECREF(chunk);
        if (seen < 0)
            goto fail;
        if (other_chunk(text, kind, data, start, i, ascii, findall, words, longs) < 0)
            goto fail;
    }
    Py_DECREF(others);
    return Py_BuildValue("(NNO)", words, longs, cjk ? Py_True : Py_False);

fail:
    Py_XDECREF(words);
    Py_XDECREF(longs);
    Py_XDECREF(others);
    return NULL;
}

/* w in lower case: ASCII done here, anything else by str.lower() */
static PyObject *lower(PyObject *w)
{
    if (!PyUnicode_IS_ASCII(w))
        return PyObject_CallMethod(w, "lower", NULL);
    const Py_UCS1 *src = PyUnicode_1BYTE_DATA(w);
    Py_ssize_t n = PyUnicode_GET_LENGTH(w), k = 0;
    while (k < n && !(src[k] >= 'A' && src[k] <= 'Z'))
        k++;
    if (k == n) {
        Py_INCREF(w);
        return w;
    }
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *dst = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t j = 0; j < n; j++)
        dst[j] = (src[j] >= 'A' && src[j] <= 'Z') ? src[j] + 32 : src[j];
    return out;
}

/* The text argument of a one-argument pass: its kind, data and length; -1 with a TypeError
 * (the pass's usage) when it is not a str. */
static int text_arg(PyObject *text, const char *usage, int *kind, const void **data,
                    Py_ssize_t *len)
{
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (PyUnicode_READY(text) < 0)
        return -1;
    *kind = PyUnicode_KIND(text);
    *data = PyUnicode_DATA(text);
    *len = PyUnicode_GET_LENGTH(text);
    return 0;
}

/* unfold(text): every line break followed by blanks (the pattern "\n[ \t]+") as one space:
 * the continuation lines of a header block joined to their header's line. */
static PyObject *unfold(PyObject *Py_UNUSED(self), PyObject *text)
{
    int kind;
    const void *data;
    Py_ssize_t len, n = 0;
    if (text_arg(text, "unfold(text: str)", &kind, &data, &len) < 0)
        return NULL;
    PyObject *out = PyUnicode_New(len, PyUnicode_MAX_CHAR_VALUE(text));
    if (out == NULL)
        return NULL;
    void *dst = PyUnicode_DATA(out);
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if (ch == '\n' && i + 1 < len) {
            Py_UCS4 next = PyUnicode_READ(kind, data, i + 1);
            if (next == ' ' || next == '\t') {
                while (i + 1 < len && ((next = PyUnicode_READ(kind, data, i + 1)) == ' '
                                       || next == '\t'))
                    i++;
                ch = ' ';
            }
        }
        PyUnicode_WRITE(kind, dst, n, ch);
        n++;
    }
    if (n == len)
        return out;
    PyObject *cut = PyUnicode_Substring(out, 0, n);
    Py_DECREF(out);
    return cut;
}

/* strip_tags(markup): tokenizer._STRIP_RE.sub(" ", markup): each script or style element,
 * comment and tag replaced by one space, found the way the pattern's alternatives are tried at
 * each "<" (see the top of the file). The text between replacements is joined with spaces. */
static inline int is_word_char(Py_UCS4 ch)  /* the pattern module's \w for str */
{
    return ch == '_' || Py_UNICODE_ISALNUM(ch);
}

/* The end of "</" + name + blanks + ">" starting at k, or -1. */
static Py_ssize_t close_tag_end(int kind, const void *data, Py_ssize_t len, Py_ssize_t k,
                                Py_ssize_t name_start, Py_ssize_t name_len)
{
    Py_ssize_t j = k + 2 + name_len;
    if (j > len)
        return -1;
    for (Py_ssize_t m = 0; m < name_len; m++)
        if (PyUnicode_READ(kind, data, k + 2 + m) != PyUnicode_READ(kind, data, name_start + m))
            return -1;
    while (j < len && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, j)))
        j++;
    return j < len && PyUnicode_READ(kind, data, j) == '>' ? j + 1 : -1;
}

/* The end of the match at i (text[i] is "<"), or -1 when none of the alternatives matches.
 * *no_gt, *no_comment_end: from where on there is no ">" / "-->" (-1: not known yet). */
static Py_ssize_t strip_match(PyObject *text, int kind, const void *data, Py_ssize_t len,
                              Py_ssize_t i, Py_ssize_t *no_gt, Py_ssize_t *no_comment_end)
{
    /* 1: <script ...</script> or <style ...</style> (the name's case as written, both) */
    static const char *names[2] = {"script", "style"};
    for (int w = 0; w < 2; w++) {
        Py_ssize_t n = (Py_ssize_t)strlen(names[w]), m = 0;
        if (i + 1 + n > len)
            continue;
        for (; m < n; m++) {
            Py_UCS4 ch = PyUnicode_READ(kind, data, i + 1 + m);
            if (ch != (Py_UCS4)names[w][m] && ch != (Py_UCS4)(names[w][m] - 32))
                break;
        }
        if (m < n)
            continue;
        Py_ssize_t p = i + 1 + n;
        if (p < len && is_word_char(PyUnicode_READ(kind, data, p)))
            break;  /* no \b after the name: the other name cannot match either */
        for (Py_ssize_t k = p; k + 1 < len; k++) {
            if (PyUnicode_READ(kind, data, k) != '<' || PyUnicode_READ(kind, data, k + 1) != '/')
                continue;
            Py_ssize_t end = close_tag_end(kind, data, len, k, i + 1, n);
            if (end >= 0)
                return end;
        }
        break;
    }
    /* 2: <!-- ... --> */
    if (i + 4 <= len && PyUnicode_READ(kind, data, i + 1) == '!'
        && PyUnicode_READ(kind, data, i + 2) == '-' && PyUnicode_READ(kind, data, i + 3) == '-'
        && (*no_comment_end < 0 || i + 4 < *no_comment_end)) {
        for (Py_ssize_t k = i + 4; k + 2 < len; k++)
            if (PyUnicode_READ(kind, data, k) == '-' && PyUnicode_READ(kind, data, k + 1) == '-'
                && PyUnicode_READ(kind, data, k + 2) == '>')
                return k + 3;
        *no_comment_end = i + 4;
    }
    /* 3: <...> */
    if (*no_gt >= 0 && i + 1 >= *no_gt)
        return -1;
    Py_ssize_t gt = PyUnicode_FindChar(text, '>', i + 1, len, 1);
    if (gt < 0) {
        if (gt == -1)
            *no_gt = i + 1;
        return gt == -1 ? -1 : -2;
    }
    return gt + 1;
}

static PyObject *strip_tags(PyObject *Py_UNUSED(self), PyObject *text)
{
    int kind;
    const void *data;
    Py_ssize_t len, seg = 0, i = 0;
    if (text_arg(text, "strip_tags(markup: str)", &kind, &data, &len) < 0)
        return NULL;
    Py_ssize_t no_gt = -1, no_comment_end = -1;
    PyObject *pieces = PyList_New(0), *sep = NULL, *out = NULL;
    if (pieces == NULL)
        return NULL;
    while (i < len) {
        Py_ssize_t lt = PyUnicode_FindChar(text, '<', i, len, 1);
        if (lt == -2)
            goto done;
        if (lt < 0)
            break;
        Py_ssize_t end = strip_match(text, kind, data, len, lt, &no_gt, &no_comment_end);
        if (end == -2)
            goto done;
        if (end < 0) {
            i = lt + 1;
            continue;
        }
        PyObject *piece = PyUnicode_Substring(text, seg, lt);
        if (piece == NULL || PyList_Append(pieces, piece) < 0) {
            Py_XDECREF(piece);
            goto done;
        }
        Py_DECREF(piece);
        seg = i = end;
    }
    if (seg == 0) {  /* nothing matched */
        Py_INCREF(text);
        out = text;
        goto done;
    }
    PyObject *rest = PyUnicode_Substring(text, seg, len);
    if (rest == NULL || PyList_Append(pieces, rest) < 0) {
        Py_XDECREF(rest);
        goto done;
    }
    Py_DECREF(rest);
    if ((sep = PyUnicode_FromString(" ")) != NULL)
        out = PyUnicode_Join(sep, pieces);
done:
    Py_XDECREF(sep);
    Py_DECREF(pieces);
    return out;
}

/* tag_parts(lower): the first 5,000 matches of tokenizer._TAG_RE in lower, as the set of
 * their tag names and their texts joined with NULs (see the top of the file). */
static PyObject *tag_parts(PyObject *Py_UNUSED(self), PyObject *text)
{
    int kind;
    const void *data;
    Py_ssize_t len, i = 0, found = 0;
    if (text_arg(text, "tag_parts(lower: str)", &kind, &data, &len) < 0)
        return NULL;
    PyObject *names = PySet_New(NULL), *texts = PyList_New(0), *nul = NULL, *joined = NULL;
    if (names == NULL || texts == NULL)
        goto done;
    while (i < len && found < 5000) {
        Py_ssize_t lt = PyUnicode_FindChar(text, '<', i, len, 1);
        if (lt == -2)
            goto done;
        if (lt < 0)
            break;
        i = lt + 1;
        Py_ssize_t p = lt + 1;
        while (p < len && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, p)))
            p++;
        Py_ssize_t name = p;
        while (p < len && p - name < 16) {
            Py_UCS4 ch = PyUnicode_READ(kind, data, p);
            if (!(ch < 128 && ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
                               || (p > name && ch >= '0' && ch <= '9'))))
                break;
            p++;
        }
        if (p == name || (p < len && is_word_char(PyUnicode_READ(kind, data, p))))
            continue;  /* no name, or no \b after its first 16 characters */
        Py_ssize_t gt = PyUnicode_FindChar(text, '>', p, len < p + 2001 ? len : p + 2001, 1);
        if (gt == -2)
            goto done;
        if (gt < 0)
            continue;  /* no ">" within 2,000 characters */
        PyObject *tag = PyUnicode_Substring(text, name, p);
        PyObject *rest = tag == NULL ? NULL : PyUnicode_Substring(text, p, gt);
        int rc = rest == NULL ? -1 : PySet_Add(names, tag);
        if (rc == 0)
            rc = PyList_Append(texts, rest);
        Py_XDECREF(tag);
        Py_XDECREF(rest);
        if (rc < 0)
            goto done;
        found++;
        i = gt + 1;
    }
    if ((nul = PyUnicode_FromStringAndSize("\0", 1)) != NULL)
        joined = PyUnicode_Join(nul, texts);
done:
    Py_XDECREF(nul);
    Py_XDECREF(texts);
    if (joined == NULL) {
        Py_XDECREF(names);
        return NULL;
    }
    return Py_BuildValue("(NN)", names, joined);
}

/* _IP_RE.fullmatch on text[start:end]: four runs of 1-3 decimal digits joined by dots. Returns
 * the end of the third run (the /24 network's text ends there), or -1. */
static Py_ssize_t ipv4_net_end(int kind, const void *data, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t i = start, net_end = -1;
    for (int part = 0; part < 4; part++) {
        Py_ssize_t digits = 0;
        while (i < end && digits < 4 && Py_UNICODE_ISDECIMAL(PyUnicode_READ(kind, data, i))) {
            i++;
            digits++;
        }
        if (digits < 1 || digits > 3)
            return -1;
        if (part < 3) {
            if (i >= end || PyUnicode_READ(kind, data, i) != '.')
                return -1;
            if (part == 2)
                net_end = i;
            i++;
        }
    }
    return i == end ? net_end : -1;
}

static inline int is_lower_alnum(Py_UCS4 ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
}

/* _HOST_RE.fullmatch on text[start:end]: labels joined by dots, the first [a-z0-9][a-z0-9-]*,
 * the middle ones (at most 8) [a-z0-9-]+, all of them 1-63 characters, the last [a-z]{2,24}. */
static int is_host(int kind, const void *data, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t label_start = start;
    int labels = 0;
    for (Py_ssize_t i = start; i <= end; i++) {
        if (i < end && PyUnicode_READ(kind, data, i) != '.')
            continue;
        Py_ssize_t n = i - label_start;
        int last = i == end;
        if (last) {
            if (labels < 1 || labels > 9 || n < 2 || n > 24)
                return 0;
            for (Py_ssize_t j = label_start; j < i; j++) {
                Py_UCS4 ch = PyUnicode_READ(kind, data, j);
                if (ch < 'a' || ch > 'z')
                    return 0;
            }
            return 1;
        }
        if (n < 1 || n > 63)
            return 0;
        for (Py_ssize_t j = label_start; j < i; j++) {
            Py_UCS4 ch = PyUnicode_READ(kind, data, j);
            if (!is_lower_alnum(ch) && (ch != '-' || (labels == 0 && j == label_start)))
                return 0;
        }
        labels++;
        label_start = i + 1;
    }
    return 0;
}

/* prefix + registrable_domain(text[start:end]) (tokenizer.registrable_domain): the last two
 * labels, or three when the second-level label is in sld and the top-level one has two
 * characters. */
static PyObject *domain_token(const char *prefix, PyObject *text, int kind, const void *data,
                              Py_ssize_t start, Py_ssize_t end, PyObject *sld)
{
    Py_ssize_t dots[3] = {-1, -1, -1};  /* the last three dots, latest first */
    int found = 0;
    for (Py_ssize_t i = end - 1; i >= start && found < 3; i--)
        if (PyUnicode_READ(kind, data, i) == '.')
            dots[found++] = i;
    Py_ssize_t from = found >= 2 ? dots[1] + 1 : start;
    if (found >= 2 && end - dots[0] - 1 == 2) {
        PyObject *second = PyUnicode_Substring(text, dots[1] + 1, dots[0]);
        if (second == NULL)
            return NULL;
        int in_sld = PySet_Contains(sld, second);
        Py_DECREF(second);
        if (in_sld < 0)
            return NULL;
        if (in_sld)
            from = found >= 3 ? dots[2] + 1 : start;
    }
    PyObject *dom = PyUnicode_Substring(text, from, end);
    if (dom == NULL)
        return NULL;
    PyObject *tok = PyUnicode_FromFormat("%s%U", prefix, dom);
    Py_DECREF(dom);
    return tok;
}

static int add_token(PyObject *out, PyObject *tok)
{
    if (tok == NULL)
        return -1;
    int rc = PySet_Add(out, tok);
    Py_DECREF(tok);
    return rc;
}

static PyObject *received_words(PyObject *Py_UNUSED(self), PyObject *const *args,
                                Py_ssize_t nargs)
{
    if (nargs != 3 || !PyAnySet_Check(args[0]) || !PyUnicode_Check(args[1])
        || !PySet_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "received_words(sld: set, low: str, out: set)");
        return NULL;
    }
    PyObject *sld = args[0], *out = args[2];
    PyObject *words = PyUnicode_Split(args[1], NULL, -1);
    if (words == NULL)
        return NULL;
    int hosts = 0, ips = 0;
    Py_ssize_t nwords = PyList_GET_SIZE(words);
    for (Py_ssize_t k = 0; k < nwords; k++) {
        PyObject *w = PyList_GET_ITEM(words, k);
        Py_ssize_t n = PyUnicode_GET_LENGTH(w);
        int kind = PyUnicode_KIND(w);
        const void *data = PyUnicode_DATA(w);
        if (PyUnicode_FindChar(w, '.', 0, n, 1) < 0)
            continue;
        Py_UCS4 first = PyUnicode_READ(kind, data, 0);
        if ((first == '[' || first == '(') && ips < 2) {
            Py_ssize_t s = 0, e = n;  /* w.strip("[]();") */
            while (s < e && in_set(PyUnicode_READ(kind, data, s), "[]();"))
                s++;
            while (e > s && in_set(PyUnicode_READ(kind, data, e - 1), "[]();"))
                e--;
            Py_ssize_t net_end = ipv4_net_end(kind, data, s, e);
            if (net_end >= 0) {
                PyObject *net = PyUnicode_Substring(w, s, net_end);
                PyObject *tok = net ? PyUnicode_FromFormat("rcvd:ip:%U", net) : NULL;
                Py_XDECREF(net);
                if (add_token(out, tok) < 0)
                    goto fail;
                ips++;
                continue;
            }
        }
        if (hosts >= 4)
            continue;
        /* the pieces between runs of ( ) [ ] < > ; , = @ / (w holds no white space) */
        Py_ssize_t start = 0;
        for (Py_ssize_t i = 0; i <= n; i++) {
            if (i < n && !in_set(PyUnicode_READ(kind, data, i), "()[]<>;,=@/"))
                continue;
            if (i > start && is_host(kind, data, start, i)) {
                if (add_token(out, domain_token("rcvd:", w, kind, data, start, i, sld)) < 0)
                    goto fail;
                hosts++;
            }
            start = i + 1;
        }
    }
    Py_DECREF(words);
    Py_RETURN_NONE;

fail:
    Py_DECREF(words);
    return NULL;
}


/* prefix + text[start:end] into out */
static int add_piece_token(PyObject *out, const char *prefix, PyObject *text, Py_ssize_t start,
                           Py_ssize_t end)
{
    PyObject *piece = PyUnicode_Substring(text, start, end);
    if (piece == NULL)
        return -1;
    PyObject *tok = PyUnicode_FromFormat("%s%U", prefix, piece);
    Py_DECREF(piece);
    return add_token(out, tok);
}

static PyObject *url_words(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyAnySet_Check(args[0]) || !PyUnicode_Check(args[1])
        || !PySet_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "url_words(sld: set, url: str, out: set)");
        return NULL;
    }
    PyObject *sld = args[0], *u = args[1], *out = args[2];
    Py_ssize_t n = PyUnicode_GET_LENGTH(u), rest;
    int kind = PyUnicode_KIND(u);
    const void *data = PyUnicode_DATA(u);
    /* the scheme: "www." means http, else what comes before "://" */
    if (n >= 4 && PyUnicode_Tailmatch(u, WWW, 0, n, -1) == 1) {
        if (add_token(out, PyUnicode_FromString("url:scheme:http")) < 0)
            return NULL;
        rest = 0;
    } else {
        Py_ssize_t sep = PyUnicode_Find(u, SCHEME_SEP, 0, n, 1);
        if (sep == -2)
            return NULL;
        if (sep < 0)
            Py_RETURN_NONE;
        if (add_piece_token(out, "url:scheme:", u, 0, sep < 10 ? sep : 10) < 0)
            return NULL;
        rest = sep + 3;
    }
    /* host[:port], up to the first / ? or #, after the last @ (userinfo) */
    Py_ssize_t hp_end = rest, at = -1, colon = -1;
    for (; hp_end < n; hp_end++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, hp_end);
        if (ch == '/' || ch == '?' || ch == '#')
            break;
        if (ch == '@')
            at = hp_end;
    }
    Py_ssize_t hp_start = rest;
    if (at >= 0) {
        if (add_token(out, PyUnicode_FromString("url:userinfo")) < 0)
            return NULL;
        hp_start = at + 1;
    }
    for (Py_ssize_t i = hp_start; i < hp_end; i++)
        if (PyUnicode_READ(kind, data, i) == ':') {
            colon = i;
            break;
        }
    Py_ssize_t hs = hp_start, he = colon >= 0 ? colon : hp_end;  /* .strip("[]").rstrip(".") */
    while (hs < he && in_set(PyUnicode_READ(kind, data, hs), "[]"))
        hs++;
    while (he > hs && in_set(PyUnicode_READ(kind, data, he - 1), "[]"))
        he--;
    while (he > hs && PyUnicode_READ(kind, data, he - 1) == '.')
        he--;
    if (he == hs)
        Py_RETURN_NONE;
    if (colon >= 0 && colon + 1 < hp_end
        && add_token(out, PyUnicode_FromString("url:port")) < 0)
        return NULL;
    if (ipv4_net_end(kind, data, hs, he) >= 0) {
        if (add_token(out, PyUnicode_FromString("url:ip")) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (he - hs > 100) {
        if (add_token(out, PyUnicode_FromString("url:longhost")) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    if (add_piece_token(out, "url:host:", u, hs, he) < 0
        || add_token(out, domain_token("url:dom:", u, kind, data, hs, he, sld)) < 0)
        return NULL;
    /* the path: what follows the host part (as long as the host part after any userinfo, as
     * the Python path slices it), its first 300 characters cut at runs of / ? & = # . + _ % -;
     * pieces of 3-20 characters that are not all digits */
    Py_ssize_t ps = rest + (hp_end - hp_start), pe = n;
    if (pe - ps <= 1)
        Py_RETURN_NONE;
    if (pe - ps > 300)
        pe = ps + 300;
    Py_ssize_t start = ps;
    for (Py_ssize_t i = ps; i <= pe; i++) {
        if (i < pe && !in_set(PyUnicode_READ(kind, data, i), "/?&=#.+_%-"))
            continue;
        Py_ssize_t len = i - start;
        if (len >= 3 && len <= 20) {
            int digits = 1;
            for (Py_ssize_t j = start; j < i && digits; j++)
                digits = Py_UNICODE_ISDIGIT(PyUnicode_READ(kind, data, j));
            if (!digits && add_piece_token(out, "url:p:", u, start, i) < 0)
                return NULL;
        }
        start = i + 1;
    }
    Py_RETURN_NONE;
}

static PyObject *shape(PyObject *Py_UNUSED(self), PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "shape(text: str)");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg), k = 0;
    int kind = PyUnicode_KIND(arg);
    const void *data = PyUnicode_DATA(arg);
    char small[256] = {0};
    char *buf = n <= (Py_ssize_t)sizeof(small) ? small : PyMem_Malloc(n ? n : 1);
    if (buf == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        char c = ch >= 128 ? '?' : ch >= '0' && ch <= '9' ? '9' : ch >= 'a' && ch <= 'z' ? 'a'
                 : ch >= 'A' && ch <= 'Z' ? 'A' : (char)ch;
        if ((c == '9' || c == 'a' || c == 'A') && k > 0 && buf[k - 1] == c)
            continue;  /* a run of one class: one character */
        buf[k++] = c;
    }
    PyObject *out = PyUnicode_DecodeASCII(buf, k, NULL);
    if (buf != small)
        PyMem_Free(buf);
    return out;
}

/* Python's str.strip() bounds of text[start:end] */
static void strip_bounds(int kind, const void *data, Py_ssize_t *start, Py_ssize_t *end)
{
    while (*start < *end && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, *start)))
        (*start)++;
    while (*end > *start && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, *end - 1)))
        (*end)--;
}

/* The (text: str, most: int) arguments of header_lines and addresses: the text read as by
 * text_arg, and most; -1 with an error set when they are not that. */
static int text_and_most(PyObject *const *args, Py_ssize_t nargs, const char *usage,
                         int *kind, const void **data, Py_ssize_t *len, Py_ssize_t *most)
{
    if (nargs != 2 || !PyLong_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (text_arg(args[0], usage, kind, data, len) < 0)
        return -1;
    *most = PyLong_AsSsize_t(args[1]);
    return *most == -1 && PyErr_Occurred() ? -1 : 0;
}

/* (text[s1:e1], text[s2:e2]) appended to the list out */
static int append_pair(PyObject *out, PyObject *text, Py_ssize_t s1, Py_ssize_t e1,
                       Py_ssize_t s2, Py_ssize_t e2)
{
    PyObject *first = PyUnicode_Substring(text, s1, e1);
    PyObject *second = first ? PyUnicode_Substring(text, s2, e2) : NULL;
    PyObject *pair = second ? PyTuple_Pack(2, first, second) : NULL;
    Py_XDECREF(first);
    Py_XDECREF(second);
    int rc = pair ? PyList_Append(out, pair) : -1;
    Py_XDECREF(pair);
    return rc;
}

/* (text[s1:e1] in lower case, text[s2:e2].strip()) appended to out: a header line's name
 * (printable ASCII) and value */
static int append_header(PyObject *out, PyObject *text, int kind, const void *data,
                         Py_ssize_t s1, Py_ssize_t e1, Py_ssize_t s2, Py_ssize_t e2)
{
    PyObject *name = PyUnicode_New(e1 - s1, 127);
    if (name == NULL)
        return -1;
    Py_UCS1 *dst = PyUnicode_1BYTE_DATA(name);
    for (Py_ssize_t j = s1; j < e1; j++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, j);
        dst[j - s1] = (Py_UCS1)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
    }
    strip_bounds(kind, data, &s2, &e2);
    PyObject *value = PyUnicode_Substring(text, s2, e2);
    PyObject *pair = value ? PyTuple_Pack(2, name, value) : NULL;
    Py_DECREF(name);
    Py_XDECREF(value);
    int rc = pair ? PyList_Append(out, pair) : -1;
    Py_XDECREF(pair);
    return rc;
}

static PyObject *header_lines(PyObject *Py_UNUSED(self), PyObject *const *args,
                              Py_ssize_t nargs)
{
    int kind;
    const void *data;
    Py_ssize_t n, most;
    if (text_and_most(args, nargs, "header_lines(text: str, most: int)", &kind, &data, &n,
                      &most) < 0)
        return NULL;
    PyObject *text = args[0];
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    /* a line start: the text's start (the "\n" the Python path puts before it) or after a \n */
    Py_ssize_t line = 0;
    while (line <= n && PyList_GET_SIZE(out) < most) {
        Py_ssize_t i = line;
        while (i < n && i - line <= 80) {  /* the name: printable ASCII but the colon */
            Py_UCS4 ch = PyUnicode_READ(kind, data, i);
            if (ch < 0x21 || ch > 0x7e || ch == ':')
                break;
            i++;
        }
        Py_ssize_t name_end = i;
        int ok = name_end > line && name_end - line <= 80;
        if (ok) {
            while (i < n && (PyUnicode_READ(kind, data, i) == ' '
                             || PyUnicode_READ(kind, data, i) == '\t'))
                i++;
            ok = i < n && PyUnicode_READ(kind, data, i) == ':';
        }
        Py_ssize_t eol = PyUnicode_FindChar(text, '\n', ok ? i + 1 : i, n, 1);
        if (eol == -2)
            goto fail;
        if (eol < 0)
            eol = n;
        if (ok && append_header(out, text, kind, data, line, name_end, i + 1, eol) < 0)
            goto fail;
        line = eol + 1;
    }
    return out;

fail:
    Py_DECREF(out);
    return NULL;
}

static inline int is_ascii_letter(Py_UCS4 ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static PyObject *attr_names(PyObject *Py_UNUSED(self), PyObject *arg)
{
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "attr_names(text: str)");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    int kind = PyUnicode_KIND(arg);
    const void *data = PyUnicode_DATA(arg);
    PyObject *out = PySet_New(NULL);
    if (out == NULL)
        return NULL;
    Py_ssize_t e = -1;
    while ((e = PyUnicode_FindChar(arg, '=', e + 1, n, 1)) >= 0) {
        /* back over the blanks before the "=", then over the name */
        Py_ssize_t q = e;
        while (q > 0 && Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, q - 1)))
            q--;
        Py_ssize_t r = q;
        while (r > 0) {
            Py_UCS4 ch = PyUnicode_READ(kind, data, r - 1);
            if (!is_ascii_letter(ch) && ch != '-')
                break;
            r--;
        }
        if (r == q || q - r > 21 || r == 0 || !is_ascii_letter(PyUnicode_READ(kind, data, r))
            || !Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, r - 1)))
            continue;
        PyObject *name = PyUnicode_Substring(arg, r, q);
        int rc = name ? PySet_Add(out, name) : -1;
        Py_XDECREF(name);
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    if (e == -2) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static inline int is_local_char(Py_UCS4 ch)  /* [\w.+'=-] */
{
    return is_word_char(ch) || ch == '.' || ch == '+' || ch == '\'' || ch == '=' || ch == '-';
}

static inline int is_domain_char(Py_UCS4 ch)  /* [\w-] */
{
    return is_word_char(ch) || ch == '-';
}

/* The end of the run of domain characters at text[i:], at most max long (i when none). */
static Py_ssize_t domain_run(int kind, const void *data, Py_ssize_t i, Py_ssize_t n,
                             Py_ssize_t max)
{
    Py_ssize_t j = i;
    while (j < n && j - i < max && is_domain_char(PyUnicode_READ(kind, data, j)))
        j++;
    return j;
}

static PyObject *addresses(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    int kind;
    const void *data;
    Py_ssize_t n, most;
    if (text_and_most(args, nargs, "addresses(text: str, most: int)", &kind, &data, &n,
                      &most) < 0)
        return NULL;
    PyObject *text = args[0];
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    /* Every match holds exactly one "@" (no class of the pattern has it), so each "@" is tried
     * in turn. Its local part is the run of local characters right before it, from where the
     * scan stands (the end of the match before), cut to its last 64: the leftmost start from
     * which the greedy {1,64} reaches the "@". The domain: up to 63 domain characters, then
     * up to 8 times a dot and up to 63 more (greedy, nothing after it to give back for). */
    Py_ssize_t pos = 0, at;
    while (PyList_GET_SIZE(out) < most
           && (at = PyUnicode_FindChar(text, '@', pos, n, 1)) >= 0) {
        Py_ssize_t start = at;
        while (start > pos && is_local_char(PyUnicode_READ(kind, data, start - 1)))
            start--;
        if (at - start > 64)
            start = at - 64;
        Py_ssize_t end = domain_run(kind, data, at + 1, n, 63);
        if (start == at || end == at + 1) {
            pos = at + 1;  /* no match with this "@" */
            continue;
        }
        for (int labels = 0; labels < 8 && end + 1 < n
                             && PyUnicode_READ(kind, data, end) == '.'; labels++) {
            Py_ssize_t next = domain_run(kind, data, end + 1, n, 63);
            if (next == end + 1)
                break;
            end = next;
        }
        if (append_pair(out, text, start, at, at + 1, end) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        pos = end;
    }
    if (PyErr_Occurred()) {  /* (PyUnicode_FindChar's -2) */
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* A token's UTF-8 bytes ("surrogatepass"): *b and *n, and in *encoded a bytes object to
   release after use (NULL for ASCII text, read in place); -1 with an exception set on error
   (``who`` names the caller). */
static int token_utf8(PyObject *tok, const unsigned char **b, Py_ssize_t *n,
                      PyObject **encoded, const char *who)
{
    *encoded = NULL;
    if (!PyUnicode_Check(tok)) {
        PyErr_Format(PyExc_TypeError, "%s: tokens must be str", who);
        return -1;
    }
    if (PyUnicode_IS_ASCII(tok)) {
        *b = PyUnicode_1BYTE_DATA(tok);
        *n = PyUnicode_GET_LENGTH(tok);
        return 0;
    }
    *encoded = PyUnicode_AsEncodedString(tok, "utf-8", "surrogatepass");
    if (*encoded == NULL)
        return -1;
    *b = (const unsigned char *)PyBytes_AS_STRING(*encoded);
    *n = PyBytes_GET_SIZE(*encoded);
    return 0;
}

/* -- the linear model (filterd/bayes/linear.py) --------------------------------------------- */
#define LINEAR_BUCKETS (1 << 18)  /* linear.BUCKETS */

/* A token's bucket (linear._bucket_py): its UTF-8 bytes read as little-endian 64-bit words
   (the last one zero-padded), each mixed in with a multiply, then a final mix (MurmurHash3's
   fmix64); -1 with an exception set on error. */
static int token_hash(PyObject *tok, uint32_t *out, uint32_t mask)
{
    PyObject *encoded;
    const unsigned char *b;
    Py_ssize_t n;
    if (token_utf8(tok, &b, &n, &encoded, "linear") < 0)
        return -1;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i += 8) {
        uint64_t c = 0;
        Py_ssize_t k = n - i < 8 ? n - i : 8;
        for (Py_ssize_t j = 0; j < k; j++)
            c |= (uint64_t)b[i + j] << (8 * j);
        h = (h ^ c) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
    }
    Py_XDECREF(encoded);
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ull;
    h ^= h >> 33;
    *out = (uint32_t)h & mask;
    return 0;
}

/* A token's bucket: the low bits of its hash. */
static int token_bucket(PyObject *tok, uint32_t *out)
{
    return token_hash(tok, out, LINEAR_BUCKETS - 1);
}

/* The linear weights buffer of an argument (LINEAR_BUCKETS int32s) into *view (flags:
   PyBUF_SIMPLE, or PyBUF_WRITABLE to change them), or view->buf NULL for None; -1 with an
   exception set on error. Release with release_weights. */
static int get_weights(PyObject *o, Py_buffer *view, const char *who, int flags)
{
    view->buf = NULL;
    if (o == Py_None)
        return 0;
    if (PyObject_GetBuffer(o, view, flags) < 0)
        return -1;
    if (view->len != (Py_ssize_t)sizeof(int32_t) * LINEAR_BUCKETS) {
        PyBuffer_Release(view);
        view->buf = NULL;
        PyErr_Format(PyExc_ValueError, "%s: weights must hold linear.BUCKETS int32s", who);
        return -1;
    }
    return 0;
}

static void release_weights(Py_buffer *view)
{
    if (view->buf != NULL)
        PyBuffer_Release(view);
}

/* A token's cache entry (engine.ENTRY): f, ln f, ln(1 - f) and its linear weight, packed in
   one bytes object (one object to reach per token, where a tuple of numbers was five). */
typedef struct {
    double f, lf, l1f;
    int64_t w;
} entry_t;
#define ENTRY_SIZE ((Py_ssize_t)sizeof(entry_t))

/* A growing buffer of (ln f, ln(1 - f)) pairs, handed over as bytes at the end. */
typedef struct {
    double *d;
    Py_ssize_t n, cap;  /* doubles */
} pairs_t;

static int pairs_add(pairs_t *b, double lf, double l1f)
{
    if (b->n + 2 > b->cap) {
        Py_ssize_t cap = b->cap ? 2 * b->cap : 512;
        double *d = PyMem_Realloc(b->d, sizeof(double) * (size_t)cap);
        if (d == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->d = d;
        b->cap = cap;
    }
    b->d[b->n++] = lf;
    b->d[b->n++] = l1f;
    return 0;
}

static PyObject *pairs_bytes(pairs_t *b)
{
    PyObject *out = PyBytes_FromStringAndSize((const char *)b->d,
                                              (Py_ssize_t)sizeof(double) * b->n);
    PyMem_Free(b->d);
    b->d = NULL;
    return out;
}

static PyObject *cached_logs(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "cached_logs(cache: dict, tokens)");
        return NULL;
    }
    PyObject *cache = args[0];
    PyObject *missing = PyList_New(0), *logs = NULL;
    PyObject *it = NULL, *tok;
    pairs_t pairs = {NULL, 0, 0};
    long long wsum = 0;
    if (missing == NULL)
        goto fail;
    if ((it = PyObject_GetIter(args[1])) == NULL)
        goto fail;
    while ((tok = PyIter_Next(it)) != NULL) {
        PyObject *v = PyDict_GetItemWithError(cache, tok);  /* borrowed */
        int rc = 0;
        if (v == NULL) {
            rc = PyErr_Occurred() ? -1 : PyList_Append(missing, tok);
        } else if (PyBytes_CheckExact(v) && PyBytes_GET_SIZE(v) == ENTRY_SIZE) {
            entry_t e;
            memcpy(&e, PyBytes_AS_STRING(v), sizeof e);
            rc = pairs_add(&pairs, e.lf, e.l1f);
            wsum += e.w;
        } else if (PyLong_CheckExact(v)) {  /* learned, no evidence: its weight */
            long long w = PyLong_AsLongLong(v);
            rc = w == -1 && PyErr_Occurred() ? -1 : 0;
            wsum += w;
        } else if (v != Py_None) {
            PyErr_SetString(PyExc_TypeError, "cache values must be entries (engine.ENTRY), "
                            "weights or None");
            rc = -1;
        }
        Py_DECREF(tok);
        if (rc < 0)
            goto fail;
    }
    Py_CLEAR(it);
    if (PyErr_Occurred() || (logs = pairs_bytes(&pairs)) == NULL)
        goto fail;
    return Py_BuildValue("(NNL)", missing, logs, wsum);

fail:
    Py_XDECREF(it);
    Py_XDECREF(missing);
    PyMem_Free(pairs.d);
    return NULL;
}

static PyObject *token_logs(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10 || !PyDict_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "token_logs(cache: dict, missing, packed: dict, nspam, "
                        "nham, robs, robx, min_dev, min_count, weights)");
        return NULL;
    }
    PyObject *cache = args[0], *packed = args[2];
    pairs_t pairs = {NULL, 0, 0};
    long long nspam = PyLong_AsLongLong(args[3]), nham = PyLong_AsLongLong(args[4]);
    double robs = PyFloat_AsDouble(args[5]), robx = PyFloat_AsDouble(args[6]);
    double min_dev = PyFloat_AsDouble(args[7]);
    long long min_count = PyLong_AsLongLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    if (nspam <= 0 || nham <= 0) {
        PyErr_SetString(PyExc_ValueError, "token_logs: nspam and nham must be positive");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(args[1]), *tok;
    if (it == NULL)
        return NULL;
    while ((tok = PyIter_Next(it)) != NULL) {
        int rc = PyDict_SetItem(cache, tok, Py_None);
        Py_DECREF(tok);
        if (rc < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (get_weights(args[9], &view, "token_logs", PyBUF_SIMPLE) < 0)
        return NULL;
    const int32_t *weights = (const int32_t *)view.buf;
    long long wsum = 0;
    /* the tokens' buckets first, their weights asked of memory at once (each is a cache miss
       in a 1 MB array: waited for together, not one after another) */
    uint32_t *bk = NULL;
    Py_ssize_t pos = 0, k = 0;
    PyObject *key, *value;
    if (weights != NULL && PyDict_GET_SIZE(packed) > 0) {
        bk = PyMem_Malloc(sizeof(uint32_t) * (size_t)PyDict_GET_SIZE(packed));
        if (bk == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        while (PyDict_Next(packed, &pos, &key, &value)) {
            if (token_bucket(key, &bk[k]) < 0)
                goto fail;
#if defined(__GNUC__) || defined(__clang__)
            __builtin_prefetch(&weights[bk[k]]);
#endif
            k++;
        }
        pos = 0;
        k = 0;
    }
    /* as classifier.probabilities, operation for operation */
    const double prior = robs * robx, lo = 1e-9, hi = 1 - 1e-9;
    const double dspam = (double)nspam, dham = (double)nham;
    while (PyDict_Next(packed, &pos, &key, &value)) {
        if (!PyLong_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "token_logs: packed counts must be integers");
            goto fail;
        }
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError,
                                "token_logs: packed counts do not fit in 64 bits");
            goto fail;
        }
        long w = bk != NULL ? weights[bk[k++]] : 0;
        wsum += w;
        long long s = v >> 32, h = v & 0xFFFFFFFFLL, n = s + h;
        double f = 0.5;
        int evidence = !(n <= 0 || n < min_count);
        if (evidence) {
            double sr = (double)s / dspam;
            f = (prior + (double)n * (sr / (sr + (double)h / dham))) / (robs + (double)n);
            evidence = !(fabs(f - 0.5) < min_dev);
        }
        PyObject *t;
        if (!evidence) {
            t = PyLong_FromLong(w);  /* learned, no evidence: its weight alone */
        } else {
            if (lo > f)  /* min(max(f, 1e-9), 1 - 1e-9) */
                f = lo;
            if (hi < f)
                f = hi;
            entry_t e = {f, log(f), log(1.0 - f), w};
            t = PyBytes_FromStringAndSize((const char *)&e, sizeof e);
            if (t != NULL && pairs_add(&pairs, e.lf, e.l1f) < 0)
                Py_CLEAR(t);
        }
        if (t == NULL)
            goto fail;
        int rc = PyDict_SetItem(cache, key, t);
        Py_DECREF(t);
        if (rc < 0)
            goto fail;
    }
    PyMem_Free(bk);
    release_weights(&view);
    PyObject *logs = pairs_bytes(&pairs);
    if (logs == NULL)
        return NULL;
    return Py_BuildValue("(NL)", logs, wsum);
fail:
    PyMem_Free(bk);
    PyMem_Free(pairs.d);
    release_weights(&view);
    return NULL;
}

/* The sum of count doubles (every stride-th from values), correctly rounded: the algorithm
 * of CPython's math.fsum (Shewchuk's non-overlapping partials, then the half-even fix-up across
 * partials). Finite inputs only: an infinite or NaN item, or an intermediate overflow, is a
 * ValueError. -1.0 with an exception set on error. */
#define FSUM_PARTIALS 64  /* finite doubles never need more than about 40 */
static double exact_sum(const double *values, Py_ssize_t count, Py_ssize_t stride,
                        const char *what)
{
    double p[FSUM_PARTIALS], x, y, t, hi, yr, lo = 0.0;
    Py_ssize_t n = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        x = values[k * stride];
        if (!isfinite(x))
            goto not_finite;
        Py_ssize_t i = 0;
        for (Py_ssize_t j = 0; j < n; j++) {
            y = p[j];
            if (fabs(x) < fabs(y)) {
                t = x;
                x = y;
                y = t;
            }
            hi = x + y;
            yr = hi - x;
            lo = y - yr;
            if (lo != 0.0)
                p[i++] = lo;
            x = hi;
        }
        n = i;
        if (x != 0.0) {
            if (!isfinite(x))
                goto not_finite;
            if (n >= FSUM_PARTIALS) {
                PyErr_Format(PyExc_ValueError, "fisher: too many partials summing %s", what);
                return -1.0;
            }
            p[n++] = x;
        }
    }
    hi = 0.0;
    if (n > 0) {
        hi = p[--n];
        while (n > 0) {
            x = hi;
            y = p[--n];
            hi = x + y;
            yr = hi - x;
            lo = y - yr;
            if (lo != 0.0)
                break;
        }
        if (n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0))) {
            y = lo * 2.0;
            x = hi + y;
            yr = x - hi;
            if (y == yr)
                hi = x;
        }
    }
    return hi;
not_finite:
    PyErr_Format(PyExc_ValueError, "fisher: %s holds a value that is not finite, or its sum "
                 "overflows", what);
    return -1.0;
}

/* classifier._chi2q_log, operation for operation; lgamma: Python's math.lgamma. -1.0 with an
 * exception set on error. */
static double chi2q_log(double log_sum, long long n, PyObject *lgamma)
{
    double m = -log_sum;
    if (m <= 0)
        return 1.0;
    long long k = (long long)m;  /* int(m): m > 0, so truncation is the floor */
    if (n - 1 < k)
        k = n - 1;
    PyObject *arg = PyLong_FromLongLong(k + 1);
    if (arg == NULL)
        return -1.0;
    PyObject *lg = PyObject_CallOneArg(lgamma, arg);
    Py_DECREF(arg);
    if (lg == NULL)
        return -1.0;
    double g = PyFloat_AsDouble(lg);
    Py_DECREF(lg);
    if (g == -1.0 && PyErr_Occurred())
        return -1.0;
    double t0 = exp((-m + (double)k * log(m)) - g);
    if (t0 == 0.0)
        return 0.0;
    double total = t0, t = t0;
    for (long long i = k; i > 0; i--) {
        t *= (double)i / m;
        total += t;
        if (t < total * 1e-17)
            break;
    }
    t = t0;
    for (long long i = k + 1; i < n; i++) {
        t *= m / (double)i;
        total += t;
        if (t < total * 1e-17)
            break;
    }
    return total < 1.0 ? total : 1.0;
}

static PyObject *fisher(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyCallable_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fisher(lgamma, parts, n_eff: int)");
        return NULL;
    }
    long long n_eff = PyLong_AsLongLong(args[2]);
    if (n_eff == -1 && PyErr_Occurred())
        return NULL;
    PyObject *parts = PySequence_Fast(args[1], "fisher: parts must be a sequence of bytes");
    if (parts == NULL)
        return NULL;
    PyObject *result = NULL;
    double *pairs = NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(parts), n = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(parts, k);
        if (!PyBytes_Check(b) || PyBytes_GET_SIZE(b) % (2 * sizeof(double))) {
            PyErr_SetString(PyExc_TypeError, "fisher: each part must be bytes of "
                            "(ln f, ln(1 - f)) pairs of doubles");
            goto done;
        }
        n += PyBytes_GET_SIZE(b) / (Py_ssize_t)(2 * sizeof(double));
    }
    if (n <= 0) {  /* as combine_logs: no evidence */
        result = Py_BuildValue("(dddi)", 0.5, 0.0, 0.0, 0);
        goto done;
    }
    pairs = PyMem_Malloc(sizeof(double) * 2 * (size_t)n);
    if (pairs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *b = PySequence_Fast_GET_ITEM(parts, k);
        memcpy((char *)pairs + at, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
        at += PyBytes_GET_SIZE(b);
    }
    double log_h = exact_sum(pairs, n, 2, "the ln f");
    if (log_h == -1.0 && PyErr_Occurred())
        goto done;
    double log_s = exact_sum(pairs + 1, n, 2, "the ln(1 - f)");
    if (log_s == -1.0 && PyErr_Occurred())
        goto done;
    long long dof = n;
    if (0 < n_eff && n_eff < n) {
        double scale = (double)n_eff / (double)n;
        log_h *= scale;
        log_s *= scale;
        dof = n_eff;
    }
    double q_s = chi2q_log(log_s, dof, args[0]);
    if (q_s == -1.0 && PyErr_Occurred())
        goto done;
    double q_h = chi2q_log(log_h, dof, args[0]);
    if (q_h == -1.0 && PyErr_Occurred())
        goto done;
    double spam_ev = 1.0 - q_s, ham_ev = 1.0 - q_h;
    result = Py_BuildValue("(dddn)", (1.0 + spam_ev - ham_ev) / 2.0, spam_ev, ham_ev, n);
done:
    PyMem_Free(pairs);
    Py_DECREF(parts);
    return result;
}

/* -- the presence filter -------------------------------------------------------------------- */
#define PRESENCE_BYTES (1 << 20)  /* presence.PRESENCE_BITS / 8 */
static uint32_t crc_table[256];

static void init_crc_table(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

/* list.append(int(v)); -1 with an exception set on error. */
static int append_uint(PyObject *list, unsigned long v)
{
    PyObject *n = PyLong_FromUnsignedLong(v);
    if (n == NULL)
        return -1;
    int rc = PyList_Append(list, n);
    Py_DECREF(n);
    return rc;
}

/* The 4 bit numbers of a token (presence._bits); -1 with an exception set on error. */
static int presence_bits(PyObject *tok, uint32_t bits[4])
{
    PyObject *encoded;
    const unsigned char *b;
    Py_ssize_t n;
    if (token_utf8(tok, &b, &n, &encoded, "presence") < 0)
        return -1;
    uint32_t h1 = 0xFFFFFFFFu, h2 = 0xFFFFFFFFu;
    for (Py_ssize_t i = 0; i < n; i++) {
        h1 = crc_table[(h1 ^ b[i]) & 0xFF] ^ (h1 >> 8);
        h2 = crc_table[(h2 ^ b[n - 1 - i]) & 0xFF] ^ (h2 >> 8);
    }
    Py_XDECREF(encoded);
    h1 ^= 0xFFFFFFFFu;
    h2 ^= 0xFFFFFFFFu;
    uint32_t base = (h1 >> 18) << 9;
    bits[0] = base | (h1 & 511);
    bits[1] = base | ((h1 >> 9) & 511);
    bits[2] = base | (h2 & 511);
    bits[3] = base | ((h2 >> 9) & 511);
    return 0;
}

/* The bytes of a filter: bytes or a bytearray of PRESENCE_BYTES, else NULL. */
static const unsigned char *filter_bytes(PyObject *o)
{
    if (PyBytes_Check(o) && PyBytes_GET_SIZE(o) == PRESENCE_BYTES)
        return (const unsigned char *)PyBytes_AS_STRING(o);
    if (PyByteArray_Check(o) && PyByteArray_GET_SIZE(o) == PRESENCE_BYTES)
        return (const unsigned char *)PyByteArray_AS_STRING(o);
    return NULL;
}

/* Whether all 4 bits are set in map (PRESENCE_BYTES long). */
static inline int all_set(const unsigned char *map, const uint32_t bits[4])
{
    for (int i = 0; i < 4; i++)
        if (!(map[bits[i] >> 3] & (0x80 >> (bits[i] & 7))))
            return 0;
    return 1;
}

static PyObject *presence_positions(PyObject *Py_UNUSED(self), PyObject *const *args,
                                    Py_ssize_t nargs)
{
    const unsigned char *known = nargs == 2 && args[1] != Py_None ? filter_bytes(args[1]) : NULL;
    if (nargs < 1 || nargs > 2 || (nargs == 2 && args[1] != Py_None && known == NULL)) {
        PyErr_SetString(PyExc_TypeError, "presence_positions(tokens, known: the filter's "
                        "PRESENCE_BITS / 8 bytes or None = None)");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(args[0]), *tok, *out = PyList_New(0);
    if (it == NULL || out == NULL)
        goto error;
    uint32_t bits[4];
    while ((tok = PyIter_Next(it)) != NULL) {
        int rc = presence_bits(tok, bits);
        Py_DECREF(tok);
        if (rc < 0)
            goto error;
        if (known != NULL && all_set(known, bits))
            continue;
        for (int i = 0; i < 4; i++)
            if (append_uint(out, bits[i]) < 0)
                goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(it);
    return out;
error:
    Py_XDECREF(it);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *presence_filter(PyObject *Py_UNUSED(self), PyObject *const *args,
                                 Py_ssize_t nargs)
{
    const unsigned char *map = nargs == 2 ? filter_bytes(args[0]) : NULL;
    if (map == NULL || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "presence_filter(bitmap: the filter's PRESENCE_BITS / 8 bytes, tokens: list)");
        return NULL;
    }
    PyObject *tokens = args[1], *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    uint32_t bits[4];
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(tokens); k++) {
        PyObject *tok = PyList_GET_ITEM(tokens, k);
        if (presence_bits(tok, bits) < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (all_set(map, bits) && PyList_Append(out, tok) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* linear_step(weights, buckets, bias, spam, c, offset=0.0) -> (dw, db): linear._step_py,
   operation for operation: the margin of the message whose tokens' buckets (or 32-bit hashes:
   a bucket is a hash's low bits) are given, plus offset (Fisher's say), PA-I's step for it,
   dw added to each bucket's weight in place (saturating at the int32 limits); db is 0. */
static PyObject *linear_step(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 5 && nargs != 6) || args[0] == Py_None) {
        PyErr_SetString(PyExc_TypeError,
                        "linear_step(weights, buckets, bias, spam, c, offset=0.0)");
        return NULL;
    }
    Py_buffer wv, bv;
    if (get_weights(args[0], &wv, "linear_step", PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &bv, PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&wv);
        return NULL;
    }
    PyObject *result = NULL;
    if (bv.itemsize != 4 || bv.format == NULL || (strcmp(bv.format, "I") != 0
                                                   && strcmp(bv.format, "=I") != 0)) {
        PyErr_SetString(PyExc_TypeError, "linear_step: buckets must be an array('I')");
        goto done;
    }
    long long bias = PyLong_AsLongLong(args[2]);
    int spam = PyObject_IsTrue(args[3]);
    double c = PyFloat_AsDouble(args[4]);
    double offset = nargs == 6 ? PyFloat_AsDouble(args[5]) : 0.0;
    if ((bias == -1 || c == -1.0 || offset == -1.0) && PyErr_Occurred())
        goto done;
    if (spam < 0)
        goto done;
    int32_t *w = (int32_t *)wv.buf;
    const uint32_t *bk = (const uint32_t *)bv.buf;
    Py_ssize_t n = bv.len / 4;
    const uint32_t mask = LINEAR_BUCKETS - 1;  /* (a token's hash: its bucket is its low bits) */
    long long total = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        total += w[bk[i] & mask];
    /* offset + margin(): UNIT * (bias + total / sqrt(n)), or UNIT * bias without tokens */
    const double unit = 1e-6;
    double z = offset + (n ? unit * ((double)bias + (double)total / sqrt((double)n))
                         : unit * (double)bias);
    double y = spam ? 1.0 : -1.0, loss = 1.0 - y * z;
    if (loss <= 0.0 || n <= 0) {
        result = Py_BuildValue("(ii)", 0, 0);
        goto done;
    }
    double tau = loss < c ? loss : c;  /* min(c, loss) */
    long long dw = (long long)nearbyint(tau * y / sqrt((double)n) / unit);  /* round(): half
                                                                               to even */
    long long db = 0;  /* (the bias is not learned: linear.step) */
    if (dw)
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t *x = &w[bk[i] & mask];
            long long v = (long long)*x + dw;
            *x = v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : (int32_t)v;
        }
    result = Py_BuildValue("(LL)", dw, db);
done:
    PyBuffer_Release(&bv);
    PyBuffer_Release(&wv);
    return result;
}

/* linear_buckets(tokens, mask=linear.MASK) -> list[int]: each token's bucket (its hash's low
   bits), in the order given; with mask linear.HASH_MASK its 32-bit hash. */
static PyObject *linear_buckets(PyObject *Py_UNUSED(self), PyObject *const *args,
                                Py_ssize_t nargs)
{
    uint32_t mask = LINEAR_BUCKETS - 1;
    if (nargs == 2) {
        unsigned long m = PyLong_AsUnsignedLong(args[1]);
        if (m == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        if (m > 0xFFFFFFFFul) {
            PyErr_SetString(PyExc_ValueError, "linear_buckets: the mask is 32 bits at most");
            return NULL;
        }
        mask = (uint32_t)m;
    } else if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "linear_buckets(tokens, mask=linear.MASK)");
        return NULL;
    }
    PyObject *it = PyObject_GetIter(args[0]), *tok, *out = PyList_New(0);
    if (it == NULL || out == NULL)
        goto error;
    uint32_t h;
    while ((tok = PyIter_Next(it)) != NULL) {
        int rc = token_hash(tok, &h, mask);
        Py_DECREF(tok);
        if (rc < 0)
            goto error;
        if (append_uint(out, h) < 0)
            goto error;
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(it);
    return out;
error:
    Py_XDECREF(it);
    Py_XDECREF(out);
    return NULL;
}

/* -- the header tokens (tokenizer._header_tokens_py) ----------------------------------------- */
/* What each selected header name gives (tokenizer._HEADER_CODES). */
enum {
    H_SUBJECT = 1, H_FROM, H_SENDER, H_TO, H_CC, H_REPLY_TO, H_ERRORS_TO, H_RETURN_PATH,
    H_MESSAGE_ID, H_DATE, H_MAILER, H_RECEIVED, H_CONTENT_TYPE, H_WORDS, H_CTE
};

/* The strings the header tokens are made of, interned once. */
static PyObject *S_UPPER, *S_STRIP, *S_ENC_MARK, *S_BANGS, *S_BY, *S_SEMI,
    *S_STRIP_MID, *S_STRIP_LOCAL, *S_EMPTY, *S_COLON, *S_FROM, *S_SENDER, *S_TO, *S_RT, *S_ET,
    *S_RP, *S_SUBJ, *S_MAILER, *S_MID_DOM, *S_MID_SHAPE, *S_DATE_TZ, *S_DATE_SHAPE, *S_CTYPE,
    *S_CHARSET, *S_CTE, *T_ALLCAPS, *T_BANGS, *T_FROM_NOADDR, *T_SENDER_NOADDR, *T_RP_EMPTY,
    *T_MID_NODOMAIN, *T_MID_NONE, *T_DATE_NONE;

static int init_header_strings(void)
{
    struct { PyObject **p; const char *s; } all[] = {
        {&S_UPPER, "upper"}, {&S_STRIP, "strip"},
        {&S_ENC_MARK, "=?"}, {&S_BANGS, "!!"}, {&S_BY, " by "}, {&S_SEMI, ";"},
        {&S_STRIP_MID, " <>"}, {&S_STRIP_LOCAL, " <"}, {&S_EMPTY, ""}, {&S_COLON, ":"},
        {&S_FROM, "from:"}, {&S_SENDER, "sender:"}, {&S_TO, "to:"}, {&S_RT, "rt:"},
        {&S_ET, "et:"}, {&S_RP, "rp:"}, {&S_SUBJ, "subj:"}, {&S_MAILER, "mailer:"},
        {&S_MID_DOM, "mid:dom:"}, {&S_MID_SHAPE, "mid:shape:"}, {&S_DATE_TZ, "date:tz:"},
        {&S_DATE_SHAPE, "date:shape:"}, {&S_CTYPE, "ctype:"}, {&S_CHARSET, "charset:"},
        {&S_CTE, "cte:top:"}, {&T_ALLCAPS, "subj:allcaps"}, {&T_BANGS, "subj:bangs"},
        {&T_FROM_NOADDR, "from:noaddr"}, {&T_SENDER_NOADDR, "sender:noaddr"},
        {&T_RP_EMPTY, "rp:empty"}, {&T_MID_NODOMAIN, "mid:nodomain"}, {&T_MID_NONE, "mid:none"},
        {&T_DATE_NONE, "date:none"},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if ((*all[i].p = PyUnicode_InternFromString(all[i].s)) == NULL)
            return -1;
    return 0;
}

/* out.add(prefix + text[:most]) (most < 0: all of it); steals nothing. -1 on error. */
static int add_cut(PyObject *out, PyObject *prefix, PyObject *text, Py_ssize_t most)
{
    PyObject *cut = most < 0 ? Py_NewRef(text) : PyUnicode_Substring(text, 0, most);
    if (cut == NULL)
        return -1;
    PyObject *tok = PyUnicode_Concat(prefix, cut);
    Py_DECREF(cut);
    if (tok == NULL)
        return -1;
    int rc = PySet_Add(out, tok);
    Py_DECREF(tok);
    return rc;
}

/* text[start:end].strip(), the blanks found by strip_bounds. */
static PyObject *stripped(PyObject *text, Py_ssize_t start, Py_ssize_t end)
{
    strip_bounds(PyUnicode_KIND(text), PyUnicode_DATA(text), &start, &end);
    return PyUnicode_Substring(text, start, end);
}

/* *p = (*p).strip(chars), the old one released; -1 on error (*p NULL). */
static int strip_chars(PyObject **p, PyObject *chars)
{
    PyObject *v = PyObject_CallMethodOneArg(*p, S_STRIP, chars);
    Py_DECREF(*p);
    *p = v;
    return v ? 0 : -1;
}

/* *p = lower(*p) (str.lower), the old one released; -1 on error (*p NULL). */
static int to_lower(PyObject **p)
{
    PyObject *v = lower(*p);
    Py_DECREF(*p);
    *p = v;
    return v ? 0 : -1;
}

/* tokenizer._address_tokens: the number of addresses, -1 on error. */
static int address_tokens(PyObject *value, PyObject *prefix, PyObject *out, int with_local)
{
    if (PyUnicode_FindChar(value, '@', 0, PyUnicode_GET_LENGTH(value), 1) < 0)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *argv[2] = {value, NULL};
    if ((argv[1] = PyLong_FromLong(50)) == NULL)
        return -1;
    PyObject *pairs = addresses(NULL, argv, 2);
    Py_DECREF(argv[1]);
    if (pairs == NULL)
        return -1;
    int n = 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(pairs); k++) {
        PyObject *pair = PyList_GET_ITEM(pairs, k);
        PyObject *dom = lower(PyTuple_GET_ITEM(pair, 1)), *tok = NULL, *local = NULL;
        int rc = -1;
        if (dom == NULL)
            goto next;
        n++;
        if ((tok = PyUnicode_FromFormat("%Udom:%U", prefix, dom)) == NULL
            || PySet_Add(out, tok) < 0)
            goto next;
        Py_CLEAR(tok);
        if (with_local) {
            if ((local = lower(PyTuple_GET_ITEM(pair, 0))) == NULL
                || (tok = PyUnicode_FromFormat("%Uaddr:%U@%U", prefix, local, dom)) == NULL
                || PySet_Add(out, tok) < 0)
                goto next;
        }
        rc = 0;
next:
        Py_XDECREF(dom);
        Py_XDECREF(tok);
        Py_XDECREF(local);
        if (rc < 0) {
            Py_DECREF(pairs);
            return -1;
        }
    }
    Py_DECREF(pairs);
    return n;
}

/* One header's tokens (the body of _header_tokens_py's loop); -1 on error. */
static int one_header(long code, PyObject *lname, PyObject *raw, PyObject *out,
                      PyObject *helpers, int *received, int *seen_mid, int *seen_date)
{
    PyObject *words = PyTuple_GET_ITEM(helpers, 0), *decode = PyTuple_GET_ITEM(helpers, 1),
             *encwords = PyTuple_GET_ITEM(helpers, 2), *regdomain = PyTuple_GET_ITEM(helpers, 3),
             *charset = PyTuple_GET_ITEM(helpers, 4), *sld = PyTuple_GET_ITEM(helpers, 5);
    PyObject *value = NULL, *a = NULL, *b = NULL, *c = NULL;
    int rc = -1;
    int enc = PyUnicode_Contains(raw, S_ENC_MARK);
    if (enc < 0)
        return -1;
    if (enc) {
        if ((a = PyObject_CallOneArg(encwords, raw)) == NULL)
            goto done;
        if (!PyList_Check(a)) {
            PyErr_SetString(PyExc_TypeError, "header_tokens: encwords must return a list");
            goto done;
        }
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(a) && k < 10; k++) {
            PyObject *pair = PyList_GET_ITEM(a, k);
            PyObject *cs = lower(PyTuple_GET_ITEM(pair, 0));
            PyObject *en = cs ? lower(PyTuple_GET_ITEM(pair, 1)) : NULL;
            PyObject *tok = en ? PyUnicode_FromFormat("enc:%U:%U:%U", lname, cs, en) : NULL;
            int r = tok ? PySet_Add(out, tok) : -1;
            Py_XDECREF(cs);
            Py_XDECREF(en);
            Py_XDECREF(tok);
            if (r < 0)
                goto done;
        }
        Py_CLEAR(a);
    }
    if (code == H_RECEIVED) {
        if (++*received > 6)
            return 0;
        if ((a = lower(raw)) == NULL)
            goto done;
        Py_ssize_t n = PyUnicode_GET_LENGTH(a);
        Py_ssize_t cut = PyUnicode_Find(a, S_BY, 0, n, 1);
        if (cut == -1)
            cut = PyUnicode_Find(a, S_SEMI, 0, n, 1);
        if (cut < -1)
            goto done;
        if (cut >= 0) {
            PyObject *cutoff = PyUnicode_Substring(a, 0, cut);
            Py_DECREF(a);
            if ((a = cutoff) == NULL)
                goto done;
        }
        PyObject *argv[3] = {sld, a, out};
        if ((b = received_words(NULL, argv, 3)) == NULL)
            goto done;
        rc = 0;
        goto done;
    }
    value = enc ? PyObject_CallOneArg(decode, raw) : Py_NewRef(raw);
    if (value == NULL)
        goto done;
    if (!PyUnicode_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "header_tokens: decode must return str");
        goto done;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(value);
    switch (code) {
    case H_SUBJECT: {
        if ((a = PyObject_CallFunctionObjArgs(words, value, S_SUBJ, out, NULL)) == NULL)
            goto done;
        if (n > 0) {
            if ((b = PyObject_CallMethodNoArgs(value, S_UPPER)) == NULL)
                goto done;
            int same = PyUnicode_Compare(b, value) == 0;
            if (same) {
                int kind = PyUnicode_KIND(value);
                const void *data = PyUnicode_DATA(value);
                for (Py_ssize_t i = 0; i < n; i++)
                    if (Py_UNICODE_ISALPHA(PyUnicode_READ(kind, data, i))) {
                        if (PySet_Add(out, T_ALLCAPS) < 0)
                            goto done;
                        break;
                    }
            }
        }
        int bangs = PyUnicode_Contains(value, S_BANGS);
        if (bangs < 0 || (bangs && PySet_Add(out, T_BANGS) < 0))
            goto done;
        break;
    }
    case H_FROM:
    case H_SENDER: {
        PyObject *pre = code == H_FROM ? S_FROM : S_SENDER;
        int k = address_tokens(value, pre, out, 1);
        if (k < 0 || (k == 0 && PySet_Add(out, code == H_FROM ? T_FROM_NOADDR
                                                             : T_SENDER_NOADDR) < 0))
            goto done;
        Py_ssize_t lt = PyUnicode_FindChar(value, '<', 0, n, 1);
        if (lt < -1)
            goto done;
        if ((a = lt >= 0 ? PyUnicode_Substring(value, 0, lt) : Py_NewRef(S_EMPTY)) == NULL
            || (b = PyUnicode_FromFormat("%Uname:", pre)) == NULL
            || (c = PyObject_CallFunctionObjArgs(words, a, b, out, NULL)) == NULL)
            goto done;
        break;
    }
    case H_TO:
    case H_CC: {
        int k = address_tokens(value, S_TO, out, 0);
        if (k < 0)
            goto done;
        if ((a = PyUnicode_FromFormat("%U:count:%d", lname, k < 10 ? k : 10)) == NULL
            || PySet_Add(out, a) < 0)
            goto done;
        break;
    }
    case H_REPLY_TO:
    case H_ERRORS_TO:
        if (address_tokens(value, code == H_REPLY_TO ? S_RT : S_ET, out, 1) < 0)
            goto done;
        break;
    case H_RETURN_PATH: {
        int k = address_tokens(value, S_RP, out, 0);
        if (k < 0 || (k == 0 && PySet_Add(out, T_RP_EMPTY) < 0))
            goto done;
        break;
    }
    case H_MESSAGE_ID: {
        *seen_mid = 1;
        Py_ssize_t at = PyUnicode_FindChar(value, '@', 0, n, -1);
        if (at < -1)
            goto done;
        /* value.rpartition("@"): no "@": ("", "", value) */
        if ((a = at >= 0 ? PyUnicode_Substring(value, 0, at) : Py_NewRef(S_EMPTY)) == NULL
            || (b = at >= 0 ? PyUnicode_Substring(value, at + 1, n) : Py_NewRef(value)) == NULL)
            goto done;
        if (strip_chars(&b, S_STRIP_MID) < 0 || to_lower(&b) < 0)
            goto done;
        if (PyUnicode_GET_LENGTH(b) > 0) {
            if ((c = PyObject_CallOneArg(regdomain, b)) == NULL)
                goto done;
            if (!PyUnicode_Check(c)) {
                PyErr_SetString(PyExc_TypeError, "header_tokens: regdomain must return str");
                goto done;
            }
            if (add_cut(out, S_MID_DOM, c, 60) < 0)
                goto done;
        } else if (PySet_Add(out, T_MID_NODOMAIN) < 0) {
            goto done;
        }
        Py_CLEAR(c);
        if (strip_chars(&a, S_STRIP_LOCAL) < 0 || (c = shape(NULL, a)) == NULL
            || add_cut(out, S_MID_SHAPE, c, 30) < 0)
            goto done;
        break;
    }
    case H_DATE: {
        *seen_date = 1;
        Py_ssize_t start = 0, end = n;
        strip_bounds(PyUnicode_KIND(value), PyUnicode_DATA(value), &start, &end);
        if (end > start) {  /* value.strip() */
            /* (str.rsplit gives a list, not empty for a text with more than blanks) */
            if ((b = PyObject_CallMethod(value, "rsplit", "On", Py_None, (Py_ssize_t)1)) == NULL)
                goto done;
            if (add_cut(out, S_DATE_TZ, PyList_GET_ITEM(b, PyList_GET_SIZE(b) - 1), 12) < 0)
                goto done;
        } else if (PySet_Add(out, S_DATE_TZ) < 0) {
            goto done;
        }
        if ((c = shape(NULL, value)) == NULL || add_cut(out, S_DATE_SHAPE, c, 40) < 0)
            goto done;
        break;
    }
    case H_MAILER:
        if ((a = PyObject_CallFunctionObjArgs(words, value, S_MAILER, out, NULL)) == NULL)
            goto done;
        break;
    case H_CONTENT_TYPE: {
        Py_ssize_t semi = PyUnicode_FindChar(value, ';', 0, n, 1);
        if (semi < -1)
            goto done;
        if ((a = stripped(value, 0, semi >= 0 ? semi : n)) == NULL || to_lower(&a) < 0
            || add_cut(out, S_CTYPE, a, 60) < 0)
            goto done;
        if ((b = PyObject_CallOneArg(charset, value)) == NULL)
            goto done;
        if (b != Py_None) {
            if (!PyUnicode_Check(b)) {
                PyErr_SetString(PyExc_TypeError, "header_tokens: charset must return str "
                                "or None");
                goto done;
            }
            if ((c = lower(b)) == NULL || add_cut(out, S_CHARSET, c, -1) < 0)
                goto done;
        }
        break;
    }
    case H_WORDS:
        if ((b = PyUnicode_Concat(lname, S_COLON)) == NULL
            || (a = PyObject_CallFunctionObjArgs(words, value, b, out, NULL)) == NULL)
            goto done;
        break;
    case H_CTE:
        if ((a = stripped(value, 0, n)) == NULL || to_lower(&a) < 0
            || add_cut(out, S_CTE, a, 30) < 0)
            goto done;
        break;
    default:
        PyErr_Format(PyExc_ValueError, "header_tokens: unknown header code %ld", code);
        goto done;
    }
    rc = 0;
done:
    Py_XDECREF(value);
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    return rc;
}

/* header_tokens(codes, helpers, headers, out) -> None: tokenizer._header_tokens_py in one C
   pass over the header fields; the helpers (words, decode, encwords, regdomain, charset, sld)
   are the Python functions (and the set) the Python path calls for the same steps. */
static PyObject *header_tokens(PyObject *Py_UNUSED(self), PyObject *const *args,
                               Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_Check(args[0]) || !PyTuple_Check(args[1])
        || PyTuple_GET_SIZE(args[1]) != 6 || !PyAnySet_Check(PyTuple_GET_ITEM(args[1], 5))
        || !PyList_Check(args[2]) || !PySet_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "header_tokens(codes: dict, helpers: (words, decode, "
                        "encwords, regdomain, charset, sld: set), headers: list, out: set)");
        return NULL;
    }
    PyObject *codes = args[0], *helpers = args[1], *headers = args[2], *out = args[3];
    int received = 0, seen_mid = 0, seen_date = 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(headers); k++) {
        PyObject *item = PyList_GET_ITEM(headers, k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
            || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))
            || !PyUnicode_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "header_tokens: headers must be (name, value) "
                            "pairs of str");
            return NULL;
        }
        PyObject *lname = PyTuple_GET_ITEM(item, 0);
        PyObject *code = PyDict_GetItemWithError(codes, lname);  /* borrowed */
        if (code == NULL) {
            if (PyErr_Occurred())
                return NULL;
            continue;  /* not a selected header */
        }
        long c = PyLong_AsLong(code);
        if (c == -1 && PyErr_Occurred())
            return NULL;
        PyObject *raw = PyUnicode_Substring(PyTuple_GET_ITEM(item, 1), 0, 4000);
        if (raw == NULL)
            return NULL;
        int rc = one_header(c, lname, raw, out, helpers, &received, &seen_mid, &seen_date);
        Py_DECREF(raw);
        if (rc < 0)
            return NULL;
    }
    if ((!seen_mid && PySet_Add(out, T_MID_NONE) < 0)
        || (!seen_date && PySet_Add(out, T_DATE_NONE) < 0))
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split_words", (PyCFunction)(void (*)(void))split_words, METH_FASTCALL,
     "split_words(findall, text) -> (words: set, long: list, cjk: bool): the tokenizer's "
     "word split (see filterd/bayes/tokenizer.py)"},
    {"unfold", (PyCFunction)unfold, METH_O,
     "unfold(text) -> str: each line break followed by blanks as one space (see "
     "tokenizer.raw_headers)"},
    {"strip_tags", (PyCFunction)strip_tags, METH_O,
     "strip_tags(markup) -> str: scripts, styles, comments and tags replaced by a space each "
     "(see tokenizer._strip_tags_py)"},
    {"tag_parts", (PyCFunction)tag_parts, METH_O,
     "tag_parts(lower) -> (names: set, texts: str): the tags' names, and their texts joined "
     "with NULs (see tokenizer._tag_parts_py)"},
    {"cached_logs", (PyCFunction)(void (*)(void))cached_logs, METH_FASTCALL,
     "cached_logs(cache, tokens) -> (missing: list, logs: bytes, weights: int): the "
     "classifier's pass over a message's tokens (see filterd/bayes/engine.py)"},
    {"received_words", (PyCFunction)(void (*)(void))received_words, METH_FASTCALL,
     "received_words(sld, low, out) -> None: the rcvd: tokens of a Received header's from "
     "clause (see filterd/bayes/tokenizer.py)"},
    {"url_words", (PyCFunction)(void (*)(void))url_words, METH_FASTCALL,
     "url_words(sld, url, out) -> None: the url: tokens of one URL (see "
     "filterd/bayes/tokenizer.py)"},
    {"shape", (PyCFunction)shape, METH_O,
     "shape(text) -> str: the text's format (see tokenizer._shape)"},
    {"header_lines", (PyCFunction)(void (*)(void))header_lines, METH_FASTCALL,
     "header_lines(text, most) -> [(name, value)]: the header lines of an unfolded header "
     "block (see tokenizer._header_lines_py)"},
    {"attr_names", (PyCFunction)attr_names, METH_O,
     "attr_names(text) -> set: the attribute names in tag text (see tokenizer._attr_names_py)"},
    {"addresses", (PyCFunction)(void (*)(void))addresses, METH_FASTCALL,
     "addresses(text, most) -> [(local, domain)]: the e-mail addresses in a header value (see "
     "tokenizer._addresses_py)"},
    {"token_logs", (PyCFunction)(void (*)(void))token_logs, METH_FASTCALL,
     "token_logs(cache, missing, packed, nspam, nham, robs, robx, min_dev, min_count, "
     "weights) -> (logs: bytes, weights: int): the looked-up tokens into the cache, their "
     "logarithms and the sum of their linear weights (see filterd/bayes/engine.py)"},
    {"fisher", (PyCFunction)(void (*)(void))fisher, METH_FASTCALL,
     "fisher(lgamma, parts, n_eff) -> (probability, spam_evidence, ham_evidence, n): Fisher's "
     "combination of the (ln f, ln(1 - f)) pairs in parts, bytes each (see "
     "filterd/bayes/engine.py)"},
    {"presence_positions", (PyCFunction)(void (*)(void))presence_positions, METH_FASTCALL,
     "presence_positions(tokens, known=None) -> list: the numbers of the tokens' bits in the "
     "presence filter (see filterd/bayes/presence.py)"},
    {"presence_filter", (PyCFunction)(void (*)(void))presence_filter, METH_FASTCALL,
     "presence_filter(bitmap, tokens) -> list: the tokens whose bits are all set (see "
     "filterd/bayes/presence.py)"},
    {"header_tokens", (PyCFunction)(void (*)(void))header_tokens, METH_FASTCALL,
     "header_tokens(codes, helpers, headers, out) -> None: the header fields' tokens (see "
     "tokenizer._header_tokens_py)"},
    {"linear_step", (PyCFunction)(void (*)(void))linear_step, METH_FASTCALL,
     "linear_step(weights, buckets, bias, spam, c, offset=0.0) -> (dw, db): one PA-I step of "
     "the linear model, applied to weights (see filterd/bayes/linear.py)"},
    {"linear_buckets", (PyCFunction)(void (*)(void))linear_buckets, METH_FASTCALL,
     "linear_buckets(tokens, mask=linear.MASK) -> list: each token's bucket, or hash (see "
     "filterd/bayes/linear.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "filterd.bayes._speedups",
    "The Bayes tokenizer's word splitter and the classifier's token pass in C (same results "
    "as the pure-Python paths).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    init_tables();
    init_crc_table();
    if (init_header_strings() < 0)
        return NULL;
    if ((WWW = PyUnicode_InternFromString("www.")) == NULL
        || (SCHEME_SEP = PyUnicode_InternFromString("://")) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "ENTRY_SIZE", (long)ENTRY_SIZE) < 0)
        Py_CLEAR(m);
    return m;
}
