"""The mailstore: local users' Maildir++ mailboxes, read over POP3 (built in) and IMAP (Dovecot).

Layout (the same as the gateway's local delivery, so Dovecot and filterd agree)::

    <root>/<domain>/<user>/Maildir/            INBOX: tmp/ new/ cur/
    <root>/<domain>/<user>/Maildir/.Junk/      Maildir++ folders (also .Sent, .Trash)

- Delivery is atomic (write in tmp/, fsync, rename into new/), so a reader never sees half a
  message and concurrent readers (POP3, Dovecot) are safe.
- Spam that reached the add_header threshold (``X-Spam-Flag: YES``, set by filterd and stripped
  from incoming mail) goes to Junk instead of INBOX, unless the user's ``junk = false``.
- Quotas: ``[mailstore] quota`` per user (override per user in ``[mailstore.users]``). A full
  mailbox defers mail with 452 4.2.2; a message larger than the whole quota bounces 552 5.2.2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..config import parse_size
from ..delivery.local import deliver_maildir, maildir_for

FOLDERS = ("Junk", "Sent", "Trash")


class QuotaExceeded(Exception):
    def __init__(self, message: str, permanent: bool):
        super().__init__(message)
        self.permanent = permanent

    @property
    def smtp(self) -> tuple[int, str]:
        return (552, "5.2.2") if self.permanent else (452, "4.2.2")


@dataclass
class UserPolicy:
    quota: int  # bytes; 0 = unlimited
    junk: bool = True  # file tagged spam into Junk


class MailStore:
    def __init__(self, root: str | Path, quota: int = 0, users: dict | None = None):
        self.root = Path(root)
        self.quota = quota
        self.users = {k.lower(): v for k, v in (users or {}).items()}
        self._usage: dict[Path, tuple[list, int]] = {}

    @classmethod
    def from_config(cls, config) -> "MailStore":
        root = config.get("delivery.maildir_root") or str(Path(config.state_dir) / "mail")
        return cls(root, parse_size(config.get("mailstore.quota", "0") or 0),
                   config.get("mailstore.users") or {})

    # -- paths ---------------------------------------------------------------------------------
    def maildir(self, address: str) -> Path:
        return maildir_for(self.root, address)

    def folder_path(self, address: str, folder: str | None) -> Path:
        md = self.maildir(address)
        if not folder or folder.upper() == "INBOX":
            return md
        return md / f".{folder}"

    def ensure(self, address: str) -> Path:
        """Create INBOX and the standard folders (Dovecot sees them subscribed)."""
        md = self.maildir(address)
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        for f in FOLDERS:
            fp = md / f".{f}"
            for sub in ("tmp", "new", "cur"):
                (fp / sub).mkdir(parents=True, exist_ok=True)
            (fp / "maildirfolder").touch(exist_ok=True)
        subs = md / "subscriptions"
        if not subs.exists():
            subs.write_text("".join(f"{f}\n" for f in FOLDERS))
        return md

    # -- policy --------------------------------------------------------------------------------
    def policy(self, address: str) -> UserPolicy:
        spec = self.users.get(address.lower()) or {}
        quota = parse_size(spec["quota"]) if spec.get("quota") else self.quota
        return UserPolicy(quota, bool(spec.get("junk", True)))

    def _dirs(self, md: Path) -> list[Path]:
        folders = [md] + ([e for e in md.iterdir() if e.is_dir() and e.name.startswith(".")]
                          if md.is_dir() else [])
        return [f / sub for f in folders for sub in ("cur", "new")]

    def usage(self, address: str, fresh: bool = False) -> int:
        """Bytes in the mailbox (all folders). Cached until a cur/ or new/ directory changes
        (every delivery, move or expunge changes its directory's mtime), so a quota check
        costs a few stat calls, not a walk of the whole mailbox."""
        md = self.maildir(address)
        dirs = self._dirs(md)
        sig = []
        for d in dirs:
            try:
                sig.append(d.stat().st_mtime_ns)
            except FileNotFoundError:
                sig.append(0)
        cached = self._usage.get(md)
        if cached and not fresh and cached[0] == sig:
            return cached[1]
        total = 0
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                try:
                    total += e.stat().st_size
                except FileNotFoundError:
                    pass  # moved or expunged meanwhile
        self._usage[md] = (sig, total)
        return total

    def check_quota(self, address: str, size: int) -> None:
        quota = self.policy(address).quota
        if not quota:
            return
        if size > quota:
            raise QuotaExceeded(f"message of {size} bytes exceeds the mailbox quota of "
                                f"{address} ({quota} bytes)", permanent=True)
        used = self.usage(address)
        if used + size > quota:
            used = self.usage(address, fresh=True)
            if used + size > quota:
                raise QuotaExceeded(f"mailbox of {address} is full ({used} of {quota} bytes "
                                    f"used)", permanent=False)

    @staticmethod
    def is_tagged_spam(data: bytes) -> bool:
        """filterd's own ``X-Spam-Flag: YES`` (incoming copies are stripped by spam_headers)."""
        from ..rewrite import field_name, field_value, header_fields, split_message

        for field in header_fields(split_message(data)[0]):
            if field_name(field) == "x-spam-flag":
                return field_value(field).upper() == "YES"
        return False

    # -- delivery ------------------------------------------------------------------------------
    def deliver(self, address: str, data: bytes, fsync: bool = True) -> tuple[str, Path]:
        """Deliver into INBOX or Junk; returns (folder, path of the new file).
        Raises QuotaExceeded or OSError."""
        self.check_quota(address, len(data))
        self.ensure(address)
        folder = "Junk" if self.policy(address).junk and self.is_tagged_spam(data) else "INBOX"
        fp = self.folder_path(address, folder)
        name = deliver_maildir(fp, data, fsync)
        md = self.maildir(address)
        if folder == "Junk":
            from .junk import JunkWatcher

            JunkWatcher(md).note_delivered_to_junk(fp / "new" / name)
        return folder, fp / "new" / name
