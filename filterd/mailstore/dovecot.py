"""Dovecot reads filterd's users through a passwd-file that filterd keeps in step with its own
users file: ``filterd user add|passwd|del`` writes both.

Dovecot cannot verify filterd's scrypt hashes, so when a password is set filterd also writes a
``{SHA512-CRYPT}`` hash (glibc crypt, which Dovecot supports everywhere) into
``[mailstore] dovecot_passwd`` (default ``<state_dir>/dovecot/passwd``; the Debian package uses
``/etc/filterd/dovecot-passwd``, which Dovecot's auth process can reach). The file is mode 0640,
group ``dovecot`` when that group exists. The shipped snippet
``packaging/dovecot/99-filterd.conf`` points Dovecot at it.
"""
from __future__ import annotations

import grp
import os
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # stdlib until Python 3.13; Debian 12 ships 3.11


def sha512_crypt(password: str) -> str:
    return "{SHA512-CRYPT}" + crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))


def passwd_path(config) -> Path:
    p = config.get("mailstore.dovecot_passwd") or ""
    return Path(p) if p else Path(config.state_dir) / "dovecot" / "passwd"


def update_passwd(path: str | Path, user: str, password: str | None) -> None:
    """Set (or with ``password=None`` remove) ``user`` in the Dovecot passwd-file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines()
                 if ln.strip() and ln.split(":", 1)[0] != user]
    if password is not None:
        lines.append(f"{user}:{sha512_crypt(password)}")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(sorted(lines)) + ("\n" if lines else ""))
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o640)
    try:  # Dovecot's auth process (user dovecot) must read it; nobody else needs to
        os.chown(tmp, -1, grp.getgrnam("dovecot").gr_gid)
    except (KeyError, PermissionError):
        pass
    os.replace(tmp, path)
