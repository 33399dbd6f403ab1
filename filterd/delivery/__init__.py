"""Delivery: routing, outbound SMTP/LMTP, local Maildir, retries and DSNs."""
from .core import DeliveryCore

__all__ = ["DeliveryCore"]
