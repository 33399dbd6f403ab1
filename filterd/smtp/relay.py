"""Envelope address parsing and relay control for the SMTP front doors.

Relay control lives in the front door, not in a plugin: it is what makes accepting a message safe
at all, so it must not be possible to switch it off by disabling a plugin, and it only applies
where filterd itself accepts responsibility for mail (gateway and submission). In proxy mode and
milter mode the MTA in front does relay control.

Rules (RFC 5321 §3.6, §4.1.2, and what open relays were abused with):

- A recipient in a local or relay domain is accepted (if it is a known recipient, when a list of
  recipients is configured); any other recipient only from ``mynetworks`` or an authenticated
  client ("Relay access denied" otherwise).
- Address tricks are refused for *everyone*: source routes (``@a,@b:user@c``), ``%`` hacks
  (``user%other@local``), bang paths (``other!user@local``), quoted local parts hiding an ``@``,
  ``%`` or ``!`` (``"user@other"@local``), more than one ``@`` (``user@other@local``), IP
  literals and malformed or trailing-dot domains. None of them has a legitimate use today and each
  has been used to get a gateway to relay for a domain it does not serve.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..verdict import Verdict

# dot-atom per RFC 5322 (ASCII) plus UTF-8 for SMTPUTF8 clients
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_ATOM_RE = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*$")
_QUOTED_RE = re.compile(r'^"(?:[^"\\\r\n]|\\[\x20-\x7e])*"$')
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9\-\u0080-\U0010ffff]{1,63}(?<!-)$")


class AddressError(ValueError):
    """A path that is not RFC 5321 syntax; ``str()`` is the reply text."""


@dataclass
class Path_:
    address: str  # "" for the null path <>
    params: dict[str, str]
    source_route: str = ""  # "@a,@b" when the client used a (deprecated) source route


def parse_path(arg: str, smtputf8: bool = False) -> Path_:
    """Parse ``<path> [params]`` after ``MAIL FROM:`` or ``RCPT TO:``.

    Returns the address without brackets (source route split off) and the ESMTP parameters
    (keys upper-cased; value ``""`` for keyword-only ones such as SMTPUTF8). Raises
    :class:`AddressError` with a reply text for bad syntax."""
    arg = arg.strip()
    if not arg.startswith("<"):
        raise AddressError("Syntax error in address: it must be enclosed in <...>")
    # find the closing bracket outside a quoted string
    inq = esc = False
    end = -1
    for i, ch in enumerate(arg[1:], 1):
        if esc:
            esc = False
        elif ch == "\\" and inq:
            esc = True
        elif ch == '"':
            inq = not inq
        elif ch == ">" and not inq:
            end = i
            break
    if end < 0:
        raise AddressError("Syntax error in address: missing closing >")
    inner, rest = arg[1:end], arg[end + 1:]
    if rest and not rest.startswith(" "):
        raise AddressError("Syntax error: space expected after the address")
    params: dict[str, str] = {}
    for item in rest.split():
        k, eq, v = item.partition("=")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9-]*$", k) or (eq and not v):
            raise AddressError(f"Syntax error in parameter {item[:40]!r}")
        params[k.upper()] = v
    route = ""
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("Syntax error in source route")
    if not smtputf8 and any(ord(c) > 127 for c in inner):
        raise AddressError("Non-ASCII address requires the SMTPUTF8 parameter")
    if any(c in inner for c in "\r\n\x00") or any(ord(c) < 32 or ord(c) == 127 for c in inner):
        raise AddressError("Control characters in address")
    if inner and "@" not in inner and inner.lower() != "postmaster":
        raise AddressError("Address must have a domain (user@domain)")
    if inner:
        local, _, domain = inner.rpartition("@") if "@" in inner else (inner, "", "")
        if local and not (_DOT_ATOM_RE.match(local) or _QUOTED_RE.match(local)):
            # may still be user@other@local: an unquoted @ in the local part
            if "@" not in local:
                raise AddressError("Syntax error in the local part of the address")
    return Path_(inner, params, route)


def split_address(address: str) -> tuple[str, str]:
    local, _, domain = address.rpartition("@")
    return local, domain


def address_tricks(path: Path_) -> str | None:
    """The reason an address is a relay trick, or None when it is a plain address."""
    if path.source_route:
        return "source routes are not accepted"
    local, domain = split_address(path.address)
    unq = local[1:-1] if local.startswith('"') and local.endswith('"') else local
    if "@" in unq:
        return "an @ inside the local part is not accepted"
    if "%" in unq:
        return "% in the local part (percent hack) is not accepted"
    if "!" in unq:
        return "! in the local part (bang path) is not accepted"
    if local.startswith('"') and ("\\" in unq):
        return "quoted local parts with escapes are not accepted"
    if domain.startswith("["):
        return "address literals are not accepted"
    if not domain or domain.endswith(".") or domain.startswith("."):
        return "malformed domain"
    labels = domain.split(".")
    if len(labels) < 1 or not all(_LABEL_RE.match(x) for x in labels):
        return "malformed domain"
    return None


@dataclass
class RelayPolicy:
    local_domains: set[str] = field(default_factory=set)
    relay_domains: set[str] = field(default_factory=set)
    mynetworks: list = field(default_factory=list)
    relay_authenticated: bool = True
    recipients: set[str] = field(default_factory=set)  # lower-case "user@dom" or "@dom"

    @classmethod
    def from_config(cls, cfg) -> "RelayPolicy":
        nets = []
        for n in cfg.get("smtp.mynetworks") or []:
            try:
                nets.append(ipaddress.ip_network(str(n).strip(), strict=False))
            except ValueError as exc:
                from ..config import ConfigError, ConfigProblem
                raise ConfigError([ConfigProblem("", None, "smtp.mynetworks",
                                                 f"bad network {n!r}: {exc}")])
        rcpts = {str(r).strip().lower() for r in cfg.get("smtp.recipients") or [] if str(r).strip()}
        rf = cfg.get("smtp.recipients_file") or ""
        if rf:
            try:
                for line in Path(rf).read_text(encoding="utf-8").splitlines():
                    line = line.split("#", 1)[0].strip().lower()
                    if line:
                        rcpts.add(line)
            except OSError as exc:
                from ..config import ConfigError, ConfigProblem
                raise ConfigError([ConfigProblem(rf, None, "smtp.recipients_file",
                                                 f"cannot read: {exc.strerror}")])
        return cls(
            local_domains={d.lower().rstrip(".") for d in cfg.get("delivery.local_domains") or []},
            relay_domains={d.lower().rstrip(".") for d in cfg.get("smtp.relay_domains") or []},
            mynetworks=nets,
            relay_authenticated=bool(cfg.get("smtp.relay_authenticated", True)),
            recipients=rcpts,
        )

    def in_mynetworks(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self.mynetworks)

    def is_ours(self, domain: str) -> bool:
        d = domain.lower()
        return d in self.local_domains or d in self.relay_domains

    def known(self, address: str) -> bool:
        if not self.recipients:
            return True
        a = address.lower()
        return a in self.recipients or "@" + a.rpartition("@")[2] in self.recipients

    def postmaster(self) -> str:
        dom = sorted(self.local_domains or self.relay_domains or {"localhost"})[0]
        return f"postmaster@{dom}"

    def check_recipient(self, path: Path_, peer_ip: str, auth_user: str) -> Verdict | None:
        """None when the recipient may be accepted; else the reject verdict."""
        addr = path.address
        trick = address_tricks(path)
        if trick:
            return Verdict.reject(f"<{addr}>: Recipient address rejected: {trick}",
                                  code=550, enhanced="5.7.1", source="relay")
        _, domain = split_address(addr)
        if self.is_ours(domain):
            if not self.known(addr):
                return Verdict.reject(f"<{addr}>: Recipient address rejected: User unknown",
                                      code=550, enhanced="5.1.1", source="relay")
            return None
        if self.in_mynetworks(peer_ip):
            return None
        if auth_user and self.relay_authenticated:
            return None
        return Verdict.reject(f"<{addr}>: Relay access denied", code=554, enhanced="5.7.1",
                              source="relay")
