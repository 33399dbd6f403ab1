"""The token database, kept in a :class:`filterd.store.Store` (SQLite by default, Redis to share
one database between gateway nodes).

Layout under a namespace (default ``bayes:``):

- ``<ns>tokens`` — one hash, field = token, value = both counts packed in one integer
  ``spam * 2**32 + ham`` so a lookup of a message's tokens is one ``HMGET`` (Redis) or one indexed
  ``IN`` query (SQLite), and learning is one ``HINCRBY`` per token. Unlearning adds negative
  amounts; counts never go below zero because only learned messages are unlearned.
- ``<ns>meta`` — hash with ``nspam`` and ``nham``, the numbers of messages learned, ``fmt<N>``,
  how many of them were learned with token format N (:data:`~.tokenizer.TOKEN_FORMAT`; messages
  learned before the marker existed have none: format 1), and ``gen``,
  bumped by every change. A node keeps the token probabilities it computed in memory while
  the ``(nspam, nham, gen)`` it reads before each message is unchanged, or has drifted by no more
  than ``[bayes] cache_drift`` (see :class:`filterd.bayes.engine.Bayes`), so common tokens cost
  no lookup; a bigger change made by any node (learn, forget) empties every node's cache.
- ``<ns>seen`` — hash, field = message digest, value 1 (learned as spam) or 2 (as ham), so a
  message is never counted twice and learning it as the other class moves it (SpamAssassin's
  behaviour).
- ``<ns>presence1`` — bitmap: the presence filter of every learned token
  (:mod:`filterd.bayes.presence`), used while ``<ns>meta`` holds ``presence1``: it covers every
  token; its value is an epoch drawn when the filter was built.
- ``<ns>linear1`` — counter array: the linear model's weights (:mod:`filterd.bayes.linear`);
  its bias is the meta field ``lbias`` and the number of messages it was trained on ``lmsgs``.
"""
from __future__ import annotations

import hashlib
import logging
import secrets

from ..store import Store
from . import linear, presence
from .tokenizer import TOKEN_FORMAT

log = logging.getLogger("filterd.bayes")

FORMAT_FIELD = f"fmt{TOKEN_FORMAT}"

SHIFT = 32
MASK = (1 << SHIFT) - 1
SPAM, HAM = 1, 2


def unpack(v: int) -> tuple[int, int]:
    return v >> SHIFT, v & MASK


def digest(raw: bytes) -> str:
    """Identity of a message for the ``seen`` index: its bytes after the header block's trace
    lines (Received, Return-Path, Delivered-To, X-*) would change per hop, so the digest covers
    the Message-ID, Subject, Date and body."""
    head, sep, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    keep = []
    for line in head.split(b"\n"):
        low = line[:12].lower()
        if low.startswith((b"message-id:", b"subject:", b"date:")):
            keep.append(line.strip())
    h = hashlib.sha256(b"\n".join(sorted(keep)) + b"\n\n" + body)
    return h.hexdigest()[:24]


class TokenStore:
    def __init__(self, store: Store, namespace: str = "bayes:"):
        self.store = store
        self.ns = namespace
        self.k_tokens = namespace + "tokens"
        self.k_meta = namespace + "meta"
        self.k_seen = namespace + "seen"
        self.k_presence = namespace + presence.MARKER
        self.k_linear = namespace + f"linear{linear.LAYOUT}"
        # the linear model's bias and the messages it was trained on, as of the last state()
        self.linear_bias = 0
        self.linear_messages = 0
        store.own_table(self.k_tokens)
        # the presence filter's epoch as of the last state(): 0 while it does not cover every
        # learned token, else a number drawn when it was built (a new one after a clear)
        self.presence_epoch = 0
        # messages learned with the current token format, as of the last state()
        self.format_messages = 0
        self._state: tuple[int, int, int] = (0, 0, 0)
        self._version: object | None = None  # the store's data_version() at that read

    async def state(self) -> tuple[int, int, int]:
        """(nspam, nham, generation): one small read per message (it also refreshes
        :attr:`format_messages`), skipped while the store's
        :meth:`~filterd.store.Store.data_version` says nothing was written since the last one
        (SQLite: no commit by any process; these keys never expire)."""
        version = self.store.data_version()  # (before the read: a write after it is seen)
        if version is not None and version == self._version:
            return self._state
        meta = await self.store.hget_many(self.k_meta, ("nspam", "nham", "gen", FORMAT_FIELD,
                                                        presence.MARKER, "lbias", "lmsgs"))
        self.format_messages = int(meta.get(FORMAT_FIELD, 0))
        self.linear_bias = int(meta.get("lbias", 0))
        self.linear_messages = int(meta.get("lmsgs", 0))
        self.presence_epoch = int(meta.get(presence.MARKER, 0))
        self._state = (int(meta.get("nspam", 0)), int(meta.get("nham", 0)),
                       int(meta.get("gen", 0)))
        self._version = version
        return self._state

    def outdated(self, nspam: int, nham: int) -> int:
        """How many of the ``nspam + nham`` learned messages were learned with an older token
        format (as of the last :meth:`state`): when not 0 the database should be retrained.
        (Forgetting a message subtracts it from the current format's count even when it was
        learned with an older one: after such forgets the figure is a little high.)"""
        return max(0, nspam + nham - self.format_messages)

    def outdated_note(self, old: int, total: int) -> str:
        """What to tell an operator when :meth:`outdated` is not 0 (the log, the commands)."""
        return (f"{old} of the {total} messages in the token database ({self.ns}) were learned "
                f"with an older tokenizer (token format before {TOKEN_FORMAT}); classification "
                "is less accurate until the database is retrained: filterd bayes train --reset "
                "--spam DIR --ham DIR")

    async def totals(self) -> tuple[int, int]:
        nspam, nham, _ = await self.state()
        return nspam, nham

    @property
    def presence_complete(self) -> bool:
        """Whether the presence filter covers every learned token (as of the last
        :meth:`state`)."""
        return self.presence_epoch > 0

    async def presence(self, into: bytearray | None = None) -> bytearray | None:
        """A copy of the presence filter (:data:`~.presence.PRESENCE_BYTES`), or None while it
        does not cover every learned token (as of the last :meth:`state`). ``into``: the copy
        read before, refilled (1 MB of fresh memory costs more than reading it)."""
        if not self.presence_complete:
            return None
        if into is None or len(into) != presence.PRESENCE_BYTES:
            into = bytearray(presence.PRESENCE_BYTES)
        await self.store.bitmap_get(self.k_presence, into)
        if (self._state[0] > 0 or self._state[1] > 0) and into.count(0) == len(into):
            # messages learned but not a bit set: the filter was lost (a Redis that evicts
            # keys, a hand-made delete). Trusting it would hide every token: look them all up,
            # and have the next learn build it again.
            log.warning("bayes: the presence filter %s is empty although %d messages were "
                        "learned (evicted or deleted?); every token is looked up until the "
                        "next learn builds it again", self.k_presence,
                        self._state[0] + self._state[1])
            await self.store.hincr(self.k_meta, {presence.MARKER: -self.presence_epoch})
            self.presence_epoch = 0
            return None
        return into

    async def build_presence(self) -> int:
        """Add every learned token to the presence filter and mark it complete; returns how
        many tokens there were. Done once per database, by the first learn of a filterd that
        has the filter (a new database: at once; an older one: one pass over its tokens).
        Bits set meanwhile by other learners are kept (the bitmap is only ever OR-ed)."""
        tokens = list(await self.store.hgetall(self.k_tokens))
        for i in range(0, len(tokens), 50_000):  # (4 positions a token: in slices)
            await self.store.bitmap_set(self.k_presence,
                                        presence.positions(tokens[i:i + 50_000]))
        # the epoch: a copy of the filter read under another one (before a clear) is not used
        # to skip writes (see apply)
        epoch = secrets.randbelow(1 << 30) + 1
        await self.store.hincr(self.k_meta, {presence.MARKER: epoch})
        self.presence_epoch = epoch
        return len(tokens)

    def linear_ready(self, nspam: int, nham: int) -> bool:
        """Whether the linear model has been trained on enough messages to be mixed in: at
        least half as many as the counts hold (as of the last :meth:`state`)."""
        return self.linear_messages > 0 and 2 * self.linear_messages >= nspam + nham

    async def linear_weights(self):
        """The linear model's weights (:data:`~.linear.BUCKETS` integers, an ``array('i')``)."""
        if not self.linear_messages:
            return linear.zeros()  # (never trained: nothing to read)
        return await self.store.counters_get(self.k_linear, linear.BUCKETS)

    async def packed(self, tokens) -> dict[str, int]:
        """Packed counts (``spam << 32 | ham``) of the tokens that were ever learned."""
        return await self.store.hget_many(self.k_tokens, tokens)

    async def counts(self, tokens) -> dict[str, tuple[int, int]]:
        """(spam, ham) counts of the tokens that were ever learned."""
        raw = await self.store.hget_many(self.k_tokens, tokens)
        return {t: (v >> SHIFT, v & MASK) for t, v in raw.items() if v}

    async def seen(self, digests: list[str]) -> dict[str, int]:
        return await self.store.hget_many(self.k_seen, digests)

    async def apply(self, token_deltas: dict[str, int], nspam: int, nham: int,
                    seen_deltas: dict[str, int], learned: int = 0,
                    known: bytearray | None = None,
                    trainer: "linear.Trainer | None" = None) -> bool:
        """Add packed token deltas, message-count deltas and seen-index deltas in one batch;
        ``learned``: change in the number of messages learned with the current token format.
        ``known``: a copy of the presence filter read under the current epoch: the tokens whose
        bits it holds need no write (bits are only ever set), and the bits written are added
        to it. ``trainer``: the linear model's changes (its weights, bias and messages trained
        on), written in the same batch. Returns whether anything was written (the generation
        moved on by one)."""
        items: dict[str, dict[str, int]] = {}
        deltas = {t: d for t, d in token_deltas.items() if d}
        bits = None
        if deltas and (nspam > 0 or nham > 0):
            # learning: the tokens' presence bits, written before (SQLite: with) the counts so
            # that no reader finds counts without them (a forget leaves the bits)
            bits = presence.positions(deltas, known)
        if deltas:
            items[self.k_tokens] = deltas
        lbias, lmsgs, weights = ((trainer.bias_delta, trainer.messages,
                                  {b: d for b, d in trainer.deltas.items() if d})
                                 if trainer else (0, 0, {}))
        meta = {k: v for k, v in (("nspam", nspam), ("nham", nham), (FORMAT_FIELD, learned),
                                  ("lbias", lbias), ("lmsgs", lmsgs)) if v}
        if deltas or meta or seen_deltas or weights:
            meta["gen"] = 1  # every change is seen by every node's token cache (cache_drift)
            items[self.k_meta] = meta
        seen = {k: v for k, v in seen_deltas.items() if v}
        if seen:
            items[self.k_seen] = seen
        if not items:
            return False
        await self.store.mhincr(items, bitmaps={self.k_presence: bits} if bits else None,
                                counters={self.k_linear: weights} if weights else None)
        if bits and known is not None:
            presence.set_bits(known, bits)
        return True

    async def all_tokens(self) -> dict[str, tuple[int, int]]:
        """Every token (admin tools: stats, export; not for the hot path)."""
        raw = await self.store.hgetall(self.k_tokens)
        return {t: unpack(v) for t, v in raw.items() if v}

    async def clear(self) -> None:
        await self.store.delete(self.k_tokens, self.k_meta, self.k_seen, self.k_presence,
                                self.k_linear)
        self.presence_epoch = 0
