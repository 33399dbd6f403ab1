"""The presence filter: a Bloom filter of every token ever learned, kept in the store beside the
token counts, so that classifying a message looks up only the tokens that may have been learned.

About half of the tokens a message brings that are not in the classifier's cache were never
learned (a name, a number, a message's own words): looking them up finds nothing, at the cost
of a B-tree seek each on SQLite. The filter says "certainly never learned" for nearly all of
them, from one bitmap read into memory when the token cache starts afresh.

- **Layout.** :data:`PRESENCE_BITS` bits (1 MiB). A token sets 4 bits inside one 512-bit
  block: the block and the bits come from the CRC-32 of the token's UTF-8 bytes and the CRC-32
  of those bytes reversed (:func:`_bits`). Bit ``n`` is byte ``n >> 3``, mask ``0x80 >> (n & 7)``,
  Redis's SETBIT numbering, so the Redis string and the SQLite BLOB (with its log of recent
  writes, see :mod:`filterd.store.sqlite`) hold the same bytes.
- **False positives** only cost a look-up that finds nothing, never a wrong result (measured:
  1 never-learned token in 60,000 passes with 100,000 tokens learned, 1 in 2,700 with 300,000,
  2 % with a million, a third with three million: then the filter saves little, and nothing
  is wrong). ``filterd bayes stats`` shows how full it is.
- **Writers** (:meth:`~filterd.bayes.store.TokenStore.apply`) set a message's bits *before*
  adding its counts (SQLite: in the same transaction), so no reader finds counts whose bits
  are missing. Bits are never cleared:
  forgetting a message leaves its tokens' bits (a false positive or two).
- **Completeness.** The filter is used only when the database says it covers every token:
  the meta field :data:`MARKER` is set once the tokens learned before the filter existed (by an
  older filterd) have been added, which the first learn of this version does
  (:meth:`~filterd.bayes.store.TokenStore.build_presence`). A node still running an older
  filterd and learning after that adds tokens without bits: upgrade every node that learns
  before the first learn with this one, or run ``filterd bayes train`` again afterwards. A
  filter found empty while messages were learned (a Redis that evicts keys) is not used, and
  the next learn builds it again.
- **Staleness.** A classifier reads the bitmap when its token cache starts afresh (see
  :class:`filterd.bayes.engine.Bayes`), and not even then while no other writer has written;
  its own learning adds the bits to its copy at once. A token first learned by another node
  or process is then missed until the next start, as the cache keeps a token's old counts.

The C extension's ``presence_positions`` and ``presence_filter`` do what
:func:`_positions_py` and :func:`_filter_py` do (tests/test_bayes_speedups.py).
"""
from __future__ import annotations

import zlib
from typing import Iterable

from .tokenizer import _c

PRESENCE_BITS = 1 << 23
PRESENCE_BYTES = PRESENCE_BITS // 8
# The layout's number: the key is "<ns>presence<LAYOUT>" and the meta field saying it is
# complete is MARKER; another layout (size, hash) gets a new number and is built afresh.
LAYOUT = 1
MARKER = f"presence{LAYOUT}"


def _bits(token: str) -> tuple[int, int, int, int]:
    """The 4 bit numbers of a token: its 512-bit block from the top 14 bits of ``h1``, the
    bits in it from the rest of ``h1`` and the low 18 bits of ``h2``."""
    b = token.encode("utf-8", "surrogatepass")
    h1 = zlib.crc32(b)
    h2 = zlib.crc32(b[::-1])
    base = (h1 >> 18) << 9
    return (base | (h1 & 511), base | ((h1 >> 9) & 511), base | (h2 & 511),
            base | ((h2 >> 9) & 511))


def _is_filter(bitmap) -> bool:
    return isinstance(bitmap, (bytes, bytearray)) and len(bitmap) == PRESENCE_BYTES


def set_bits(bitmap: bytearray, positions: Iterable[int]) -> None:
    """Set bits in a copy of the filter (the positions just written to the store)."""
    for n in positions:
        bitmap[n >> 3] |= 0x80 >> (n & 7)


def _positions_py(tokens: Iterable[str], known: bytes | bytearray | None = None) -> list[int]:
    """The numbers of the ``tokens``' bits, 4 per token (what a writer sets in the stored
    filter), leaving out the tokens whose bits are all set in ``known`` (a copy of the filter
    read before, which holds at most the bits set now)."""
    if known is not None and not _is_filter(known):
        raise TypeError("presence_positions(tokens, known: the filter's PRESENCE_BITS / 8 bytes "
                        "or None = None)")
    out: list[int] = []
    for t in tokens:
        bits = _bits(t)
        if known is None or not all(known[n >> 3] & (0x80 >> (n & 7)) for n in bits):
            out.extend(bits)
    return out


def _filter_py(bitmap: bytes, tokens: list[str]) -> list[str]:
    """The tokens whose bits are all set in ``bitmap``: those that may have been learned."""
    if not _is_filter(bitmap) or not isinstance(tokens, list):
        raise TypeError("presence_filter(bitmap: the filter's PRESENCE_BITS / 8 bytes, tokens: "
                        "list)")
    return [t for t in tokens
            if all(bitmap[n >> 3] & (0x80 >> (n & 7)) for n in _bits(t))]


def fill(bitmap: bytes) -> float:
    """The share of bits set (``filterd bayes stats``)."""
    return int.from_bytes(bitmap, "big").bit_count() / PRESENCE_BITS if bitmap else 0.0


def false_positive_rate(bitmap: bytes) -> float:
    """The chance that a never-learned token passes the filter (``filterd bayes stats``): the
    mean over the 512-bit blocks of the fourth power of the share of the block's bits set."""
    blocks = range(0, len(bitmap), 64)
    return sum((int.from_bytes(bitmap[i:i + 64], "big").bit_count() / 512) ** 4
               for i in blocks) / len(blocks) if bitmap else 0.0


# the C passes when the extension is built (and not turned off: FILTERD_PURE_PYTHON=1)
positions = getattr(_c, "presence_positions", None) or _positions_py
may_hold = getattr(_c, "presence_filter", None) or _filter_py
