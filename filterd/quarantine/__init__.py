"""Quarantine: held messages kept byte-exact on disk with a shared index, signed action tokens,
and the service the gateway, milter, web pages, mail commands and CLI use.

See docs/quarantine.md."""
from .service import ActionError, QuarantineService
from .store import Entry, QuarantineStore
from .tokens import Signer, TokenError

__all__ = ["ActionError", "Entry", "QuarantineService", "QuarantineStore", "Signer", "TokenError"]
