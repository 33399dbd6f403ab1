"""``filterd dkim keygen``: make a DKIM signing key and print the DNS record to publish."""
from __future__ import annotations

import base64
import os
import sys
from pathlib import Path


def register(sub, common) -> None:
    p = sub.add_parser("dkim", parents=[common], help="DKIM signing keys")
    dsub = p.add_subparsers(dest="dkim_command", metavar="COMMAND")
    k = dsub.add_parser("keygen", parents=[common],
                        help="write a signing key and print the DNS TXT record to publish")
    k.add_argument("--domain", required=True, help="signing domain (d=), e.g. example.com")
    k.add_argument("--selector", required=True, help="selector (s=), e.g. s2026")
    k.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa",
                   help="key type (default rsa; ed25519 is RFC 8463, not yet verified by all "
                        "receivers: publish an RSA key too)")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    k.add_argument("--dir", default="",
                   help="directory for the key (default: <state_dir>/dkim)")
    k.add_argument("--force", action="store_true", help="overwrite an existing key file")
    k.set_defaults(func=keygen)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def make_key(algorithm: str, bits: int = 2048) -> tuple[bytes, str]:
    """(private key file content, public p= value)."""
    if algorithm == "ed25519":
        import nacl.signing

        sk = nacl.signing.SigningKey.generate()
        private = base64.b64encode(bytes(sk)) + b"\n"
        public = base64.b64encode(bytes(sk.verify_key)).decode()
        return private, public
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    if bits < 1024:
        raise ValueError("RSA keys under 1024 bits are refused by receivers (RFC 8301)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def txt_record(selector: str, domain: str, algorithm: str, public: str) -> str:
    value = f"v=DKIM1; k={algorithm}; p={public}"
    chunks = [value[i:i + 250] for i in range(0, len(value), 250)]
    quoted = "\n\t".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def keygen(args) -> int:
    domain = args.domain.lower().rstrip(".")
    directory = args.dir
    if not directory:
        from ..pipeline import load_config_and_plugins

        cfg, _infos = load_config_and_plugins(args.config, args.overrides)
        directory = str(Path(cfg.get("server.state_dir") or ".") / "dkim")
    path = Path(directory) / f"{domain}.{args.selector}.key"
    if path.exists() and not args.force:
        print(f"filterd dkim keygen: {path} exists; use --force to replace it (and publish the "
              f"new record before signing with it)", file=sys.stderr)
        return 1
    try:
        private, public = make_key(args.algorithm, args.bits)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
    except (OSError, ValueError) as exc:
        print(f"filterd dkim keygen: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    alg = "ed25519-sha256" if args.algorithm == "ed25519" else "rsa-sha256"
    print(f"; private key written to {path} (mode 0600; readable by the filterd user only)")
    print("; publish this record in the DNS zone of", domain)
    print(txt_record(args.selector, domain, args.algorithm, public))
    print(";")
    print("; then add to the filterd configuration:")
    print(f';   [dkim.domains."{domain}"]')
    print(f';   selector = "{args.selector}"')
    print(f';   key = "{path}"')
    print(f';   algorithm = "{alg}"')
    return 0
