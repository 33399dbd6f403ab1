"""SMTP AUTH users: a file of hashed passwords, and the hashing helper.

File format (``[smtp] users_file``), one user per line, ``#`` starts a comment::

    alice@example.com:scrypt$16384$8$1$<salt base64>$<hash base64>

The hash is scrypt (``hashlib.scrypt``, RFC 7914) with the parameters N, r, p in the line, a
16-byte random salt and a 32-byte derived key. ``filterd user add|passwd|del|list --file PATH``
maintains the file; ``filterd user hash`` prints one line for other tools. The file is re-read
when its modification time changes, so edits take effect without a restart.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1


def hash_password(password: str, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32,
                        maxmem=256 * 1024 * 1024)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${n}${r}${p}${b64(salt)}${b64(dk)}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt, dk = encoded.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)


def read_users(path: str | Path) -> dict[str, str]:
    """{user: encoded hash}. Raises OSError/ValueError naming the file and line."""
    users: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, enc = line.rpartition(":")
        if not sep or not user or not enc.startswith("scrypt$") or enc.count("$") != 5:
            raise ValueError(f"{path}:{n}: expected user:scrypt$N$r$p$salt$hash "
                             f"(make lines with `filterd user add`)")
        users[user] = enc
    return users


def write_users(path: str | Path, users: dict[str, str]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# filterd SMTP AUTH users: user:scrypt$N$r$p$salt$hash (filterd user add)\n")
        for u in sorted(users):
            f.write(f"{u}:{users[u]}\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class UserDB:
    """The users file, re-read when it changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mtime = None
        self._users: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns != self._mtime:
            self._users = read_users(self.path)
            self._mtime = st.st_mtime_ns

    def check(self, user: str, password: str) -> bool:
        try:
            self._load()
        except (OSError, ValueError):
            pass  # keep the last good copy; the error was logged at start
        enc = self._users.get(user)
        if enc is None:
            verify_password(password, _DUMMY)  # same work for unknown users (no timing oracle)
            return False
        return verify_password(password, enc)


_DUMMY = "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
