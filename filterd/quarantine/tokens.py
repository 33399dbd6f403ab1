"""Signed action tokens: HMAC-SHA256 over recipient + entry + action + expiry.

A token is short and case-insensitive so it survives as the sub-address of a mail address
(``quarantine+r3f0c1d2e4a5b-6abcde-<sig>@gateway``) and in a URL without escaping::

    <action letter><entry id> "-" <expiry, base 36> "-" <signature, base32, 20 chars>

The recipient the entry was held for is NOT in the token but is part of the signed data, so a
token only verifies against its own entry's recipient: a token can neither be forged, nor moved
to another entry, another action or another user. Login tokens (``l``) carry no entry; they are
bound to the recipient address given beside them in the link.
Single use is enforced by the service (a used-marker in the store per entry and action).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

ACTIONS = {"r": "release", "d": "delete", "a": "allow", "b": "block", "l": "login"}
LETTERS = {v: k for k, v in ACTIONS.items()}
_TOKEN_RE = re.compile(r"^([rdabl])([0-9a-f]{0,32})-([0-9a-z]{1,10})-([a-z2-7]{20})$")


class TokenError(Exception):
    """A token that does not verify; the message says why (shown to the user)."""


@dataclass(frozen=True)
class Token:
    action: str  # release, delete, allow, block, login
    entry_id: str  # "" for login tokens
    expires: int


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


class Signer:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("quarantine secret must be at least 16 bytes")
        self.secret = secret

    def _sig(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "\0".join(parts).encode(), hashlib.sha256).digest()
        return base64.b32encode(mac[:12]).decode().lower().rstrip("=")

    def make(self, action: str, entry_id: str, recipient: str, lifetime: float,
             now: float | None = None) -> str:
        letter = LETTERS[action]
        exp = _b36(int((now or time.time()) + lifetime))
        sig = self._sig("tok", letter, entry_id, recipient.lower(), exp)
        return f"{letter}{entry_id}-{exp}-{sig}"

    def parse(self, token: str) -> Token:
        """Split a token without trusting it (the caller then calls :meth:`verify`)."""
        m = _TOKEN_RE.match((token or "").strip().lower())
        if not m:
            raise TokenError("malformed token")
        return Token(ACTIONS[m.group(1)], m.group(2), int(m.group(3), 36))

    def verify(self, token: str, recipient: str, now: float | None = None) -> Token:
        """The token's content if it is genuine for ``recipient`` and not expired."""
        t = self.parse(token)
        letter, eid, exp, sig = _TOKEN_RE.match(token.strip().lower()).groups()
        want = self._sig("tok", letter, eid, recipient.lower(), exp)
        if not hmac.compare_digest(want, sig):
            raise TokenError("invalid token (not signed by this gateway for this recipient)")
        if t.expires < (now or time.time()):
            raise TokenError("this link has expired")
        return t

    # -- values bound to other things (CSRF, session cookies) ----------------------------------
    def mac(self, *parts: str) -> str:
        return self._sig(*parts)

    def check_mac(self, value: str, *parts: str) -> bool:
        return hmac.compare_digest(self._sig(*parts), value or "")
