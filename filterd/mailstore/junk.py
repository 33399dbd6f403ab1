"""The Junk folder trains the filter.

Choice: filterd notices moves in the Maildir itself rather than through Dovecot's imapsieve.
It works with any IMAP server or mail client that writes these Maildirs (Dovecot, a webmail, a
desktop client over IMAP, even a script), needs no Pigeonhole plugin and no per-move process,
and keeps the learning logic in filterd where the Bayes store lives. The cost is a short delay:
moves are seen at the next scan (``[mailstore] junk_scan_interval``, default 1 minute, plus
``filterd mailstore learn-junk`` for cron or tests).

How: each mailbox keeps ``.filterd-junk.json``: for every message (keyed by a hash of its
content, so a move that renames the file or re-creates it is still the same message) the last
place it was seen, "junk" or "other". A message now in Junk that was last seen elsewhere is
learned as spam; one now elsewhere that was last seen in Junk is learned as ham. Mail that
filterd itself filed into Junk is recorded at delivery, so it is not learned twice. The first
scan of a mailbox only records what is there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

STATE = ".filterd-junk.json"


def content_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:40]


class JunkWatcher:
    def __init__(self, maildir: str | Path):
        self.md = Path(maildir)
        self.state_path = self.md / STATE

    @contextmanager
    def _locked_state(self):
        self.md.mkdir(parents=True, exist_ok=True)
        with open(self.md / (STATE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = (json.loads(self.state_path.read_text())
                         if self.state_path.exists() else None)
            except (OSError, ValueError):
                state = None
            box = {"state": state}
            yield box
            if box["state"] is not None:
                tmp = self.state_path.with_suffix(".tmp")
                tmp.write_text(json.dumps(box["state"]))
                os.replace(tmp, self.state_path)

    def _messages(self) -> dict[str, tuple[str, Path]]:
        """content key -> (where: "junk"|"other", path)."""
        found: dict[str, tuple[str, Path]] = {}
        folders = [(self.md, "other")]
        for entry in self.md.iterdir() if self.md.is_dir() else []:
            if entry.is_dir() and entry.name.startswith("."):
                folders.append((entry, "junk" if entry.name.lower() == ".junk" else "other"))
        for folder, where in folders:
            for sub in ("new", "cur"):
                d = folder / sub
                if not d.is_dir():
                    continue
                for f in d.iterdir():
                    try:
                        key = content_key(f)
                    except FileNotFoundError:
                        continue  # expunged or moved during the scan: seen next time
                    if key not in found or where == "junk":
                        found[key] = (where, f)
        return found

    def note_delivered_to_junk(self, path: Path) -> None:
        with self._locked_state() as box:
            state = box["state"] or {"seen": {}, "learned": {}}
            state["seen"][content_key(path)] = "junk"
            box["state"] = state

    def scan(self, learn: Callable[[str, bytes], None] | None = None) -> list[tuple[str, Path]]:
        """Compare with the last scan; call ``learn("spam"|"ham", message bytes)`` for each
        message the user moved into or out of Junk. Returns what was learned."""
        learned: list[tuple[str, Path]] = []
        with self._locked_state() as box:
            state = box["state"]
            current = self._messages()
            if state is None:  # first scan: remember, learn nothing
                box["state"] = {"seen": {k: w for k, (w, _) in current.items()}, "learned": {}}
                return learned
            seen, done = state.get("seen", {}), state.get("learned", {})
            for key, (where, path) in current.items():
                prev = seen.get(key)
                kind = None
                if where == "junk" and prev == "other":
                    kind = "spam"
                elif where == "other" and prev == "junk":
                    kind = "ham"
                if kind and done.get(key) != kind:
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        continue
                    if learn is not None:
                        learn(kind, data)
                    done[key] = kind
                    learned.append((kind, path))
            state["seen"] = {k: w for k, (w, _) in current.items()}
            state["learned"] = {k: v for k, v in done.items() if k in current}
            box["state"] = state
        return learned


def scan_all(root: str | Path, learn: Callable[[str, bytes], None] | None = None):
    """Scan every mailbox under the mailstore root; returns [(maildir, kind, path)]."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for domain in sorted(root.iterdir()):
        if not domain.is_dir():
            continue
        for user in sorted(domain.iterdir()):
            md = user / "Maildir"
            if md.is_dir():
                out += [(md, k, p) for k, p in JunkWatcher(md).scan(learn)]
    return out
