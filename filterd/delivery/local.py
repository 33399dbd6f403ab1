"""Local delivery: the embedded default mail store, one Maildir per recipient.

``<root>/<domain>/<user>/Maildir/{tmp,new,cur}``. The seam for a fuller mail store is
:func:`deliver_maildir` (path, data) → file name, and :func:`maildir_for` (address) → path;
replace them and nothing else changes.

Maildir delivery follows the usual protocol: write into ``tmp/`` with a unique name, fsync, link
into ``new/`` (rename), fsync ``new/``. A crash before the rename leaves only a tmp file.
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import time
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._+=-]")


class LocalDeliveryError(Exception):
    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def safe_component(s: str) -> str:
    """A path component from an address part: lower-cased, no separators, no leading dots."""
    s = _SAFE.sub("_", s.strip().lower()).lstrip(".")
    return s or "_"


def maildir_for(root: str | Path, address: str) -> Path:
    """``<root>/<domain>/<user>/Maildir`` for ``user@domain`` (an ``+extension`` is dropped)."""
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        raise LocalDeliveryError(f"cannot deliver locally to {address!r}: not user@domain",
                                 permanent=True)
    user = local.split("+", 1)[0]
    return Path(root) / safe_component(domain) / safe_component(user) / "Maildir"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver_maildir(path: str | Path, data: bytes, fsync: bool = True) -> str:
    """Deliver ``data`` into the Maildir at ``path`` (created if missing). Returns the file name
    in ``new/``. Raises OSError on failure (the caller retries later)."""
    md = Path(path)
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns() // 1000}.P{os.getpid()}R{secrets.token_hex(6)}." \
           f"{socket.gethostname().replace('/', '_').replace(':', '_')}"
    tmp = md / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, md / "new" / name)
    if fsync:
        _fsync_dir(md / "new")
    return name
