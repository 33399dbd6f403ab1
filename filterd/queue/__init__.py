"""Durable spool (see :mod:`filterd.queue.spool`)."""
from .spool import Envelope, Locked, NotFound, Spool, SpoolError

__all__ = ["Envelope", "Spool", "SpoolError", "Locked", "NotFound"]
