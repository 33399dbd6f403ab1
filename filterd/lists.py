"""Mailing lists administered by email, kept in the shared store (SQLite or Redis).

For a list ``team@example.org`` filterd answers these addresses:

=================================  =========================================================
``team@``                          posts: members' posts go to every active member
``team-subscribe@``                subscribe the sender (double opt-in: a confirmation mail)
``team-unsubscribe@``              unsubscribe the sender (confirmed the same way)
``team-request@``                  commands in the subject or first body line: help,
                                   subscribe, unsubscribe
``team-confirm+TOKEN@``            the reply that confirms a pending (un)subscription
``team-moderate+TOKEN@``           a moderator's reply: "approve" or "reject" a held post
``team-bounces+MEMBER=DOMAIN@``    VERP bounce address of each member's copy
``team-owner@``                    goes to the list owners
=================================  =========================================================

Store keys (prefix ``ml:``): ``ml:lists`` (set), ``ml:<list>:meta`` (JSON),
``ml:<list>:members``, ``ml:<list>:disabled`` (sets), ``ml:<list>:bounces:<member>``
(counter), ``ml:<list>:pending:<token>`` and ``ml:<list>:held:<token>`` (JSON, with expiry).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field

COMMANDS = ("subscribe", "unsubscribe", "request", "confirm", "moderate", "bounces", "owner")


@dataclass
class ListInfo:
    address: str
    description: str = ""
    owners: list[str] = field(default_factory=list)
    moderated: bool = True  # posts from non-members are held for a moderator
    secret: str = ""
    created: float = 0.0

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def cmd(self, command: str, detail: str = "") -> str:
        extra = f"+{detail}" if detail else ""
        return f"{self.local}-{command}{extra}@{self.domain}"

    @property
    def list_id(self) -> str:
        return f"{self.local}.{self.domain}"

    def to_dict(self) -> dict:
        return {"address": self.address, "description": self.description, "owners": self.owners,
                "moderated": self.moderated, "secret": self.secret, "created": self.created}


@dataclass
class ListAddress:
    """What a recipient address means for the lists: a post or one of the commands."""

    info: ListInfo
    command: str  # "post" or one of COMMANDS
    detail: str = ""  # token or VERP-encoded member


def verp_encode(member: str) -> str:
    local, _, domain = member.partition("@")
    return f"{local}={domain}"


def verp_decode(detail: str) -> str:
    local, _, domain = detail.rpartition("=")
    return f"{local}@{domain}"


class ListManager:
    def __init__(self, store, bounce_threshold: int = 3, bounce_window: float = 30 * 86400,
                 token_ttl: float = 7 * 86400):
        self.store = store
        self.bounce_threshold = bounce_threshold
        self.bounce_window = bounce_window
        self.token_ttl = token_ttl

    # -- lists ----------------------------------------------------------------------------------
    async def create(self, address: str, owners=(), description: str = "",
                     moderated: bool = True) -> ListInfo:
        address = address.lower()
        if not re.fullmatch(r"[a-z0-9._-]+@[a-z0-9.-]+", address):
            raise ValueError(f"not a valid list address: {address!r}")
        if await self.get(address) is not None:
            raise ValueError(f"list {address} already exists")
        info = ListInfo(address, description, [o.lower() for o in owners], moderated,
                        secrets.token_hex(16), time.time())
        await self.store.set_json(f"ml:{address}:meta", info.to_dict())
        await self.store.sadd("ml:lists", address)
        return info

    async def delete(self, address: str) -> bool:
        address = address.lower()
        if await self.get(address) is None:
            return False
        await self.store.delete(f"ml:{address}:meta", f"ml:{address}:members",
                                f"ml:{address}:disabled")
        await self.store.srem("ml:lists", address)
        return True

    async def get(self, address: str) -> ListInfo | None:
        data = await self.store.get_json(f"ml:{address.lower()}:meta")
        return ListInfo(**data) if data else None

    async def all(self) -> list[str]:
        return sorted(await self.store.smembers("ml:lists"))

    async def resolve(self, address: str) -> ListAddress | None:
        """Which list (and command) a recipient address is, or None."""
        addr = address.lower()
        local, _, domain = addr.rpartition("@")
        base, _, detail = local.partition("+")
        info = await self.get(f"{base}@{domain}")
        if info is not None and not detail:
            return ListAddress(info, "post")
        for cmd in COMMANDS:
            suffix = f"-{cmd}"
            if base.endswith(suffix):
                info = await self.get(f"{base[: -len(suffix)]}@{domain}")
                if info is not None:
                    return ListAddress(info, cmd, detail)
        return None

    # -- members --------------------------------------------------------------------------------
    async def add_members(self, address: str, *members: str) -> int:
        address = address.lower()
        ms = [m.lower() for m in members]
        await self.store.srem(f"ml:{address}:disabled", *ms)
        return await self.store.sadd(f"ml:{address}:members", *ms)

    async def remove_members(self, address: str, *members: str) -> int:
        ms = [m.lower() for m in members]
        await self.store.srem(f"ml:{address.lower()}:disabled", *ms)
        return await self.store.srem(f"ml:{address.lower()}:members", *ms)

    async def members(self, address: str) -> list[str]:
        return sorted(await self.store.smembers(f"ml:{address.lower()}:members"))

    async def disabled(self, address: str) -> list[str]:
        return sorted(await self.store.smembers(f"ml:{address.lower()}:disabled"))

    async def active_members(self, address: str) -> list[str]:
        members = set(await self.members(address))
        return sorted(members - set(await self.disabled(address)))

    async def is_member(self, address: str, who: str) -> bool:
        return await self.store.sismember(f"ml:{address.lower()}:members", who.lower())

    # -- confirmations and held posts -----------------------------------------------------------
    async def new_pending(self, address: str, action: str, who: str) -> str:
        token = secrets.token_hex(12)
        await self.store.set_json(f"ml:{address}:pending:{token}",
                                  {"action": action, "address": who.lower(), "ts": time.time()},
                                  ttl=self.token_ttl)
        return token

    async def take_pending(self, address: str, token: str) -> dict | None:
        if not re.fullmatch(r"[0-9a-f]{24}", token or ""):
            return None
        key = f"ml:{address}:pending:{token}"
        data = await self.store.get_json(key)
        if data is not None:
            await self.store.delete(key)  # single use
        return data

    async def hold(self, address: str, sender: str, raw: bytes) -> str:
        token = secrets.token_hex(12)
        await self.store.set_json(f"ml:{address}:held:{token}", {
            "sender": sender, "raw": base64.b64encode(raw).decode(), "ts": time.time()},
            ttl=self.token_ttl * 2)
        return token

    async def take_held(self, address: str, token: str) -> tuple[str, bytes] | None:
        if not re.fullmatch(r"[0-9a-f]{24}", token or ""):
            return None
        key = f"ml:{address}:held:{token}"
        data = await self.store.get_json(key)
        if data is None:
            return None
        await self.store.delete(key)
        return data["sender"], base64.b64decode(data["raw"])

    # -- bounces --------------------------------------------------------------------------------
    async def record_bounce(self, address: str, member: str) -> bool:
        """Count a hard bounce; returns True when the member was just disabled."""
        n = await self.store.incr(f"ml:{address}:bounces:{member.lower()}", 1,
                                  ttl=self.bounce_window)
        if n >= self.bounce_threshold and await self.is_member(address, member):
            added = await self.store.sadd(f"ml:{address}:disabled", member.lower())
            return bool(added)
        return False

    # -- one-click unsubscribe (RFC 8058) --------------------------------------------------------
    @staticmethod
    def unsubscribe_token(info: ListInfo, member: str) -> str:
        msg = f"unsubscribe\0{info.address}\0{member.lower()}".encode()
        return hmac.new(info.secret.encode(), msg, hashlib.sha256).hexdigest()[:32]

    async def one_click_unsubscribe(self, address: str, member: str, token: str) -> bool:
        info = await self.get(address)
        if info is None:
            return False
        if not hmac.compare_digest(self.unsubscribe_token(info, member), token or ""):
            return False
        return bool(await self.remove_members(address, member))
