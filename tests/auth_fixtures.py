"""Helpers shared by the sender-authentication tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parent / "data"


def spf_zones(zonedata: dict) -> dict:
    """The OpenSPF suite's ``zonedata`` as FixtureResolver zones. Follows the suite driver's
    conventions: ``TIMEOUT`` alone times out every type not listed before it, ``NONE`` lists nothing
    (but stops SPF-to-TXT copying), and SPF (type 99) records are copied to TXT when the name has
    no TXT."""
    zones: dict = {}
    for name, items in (zonedata or {}).items():
        entry: dict = {}
        has_txt = any(isinstance(i, dict) and "TXT" in i for i in items or [])
        spf_as_txt: list = []
        for item in items or []:
            if item == "TIMEOUT":
                entry["*"] = "TIMEOUT"
                break
            for t, v in item.items():
                t = t.upper()
                if v == "TIMEOUT":
                    entry[t] = "TIMEOUT"
                    continue
                if v == "NONE":  # the suite's driver: the type is simply not there
                    continue
                entry.setdefault(t, [])
                if t in ("TXT", "SPF"):
                    v = "".join(v) if isinstance(v, list) else str(v)
                    if t == "SPF" and not has_txt:
                        spf_as_txt.append(v)
                elif t == "MX":
                    v = f"{v[0]} {v[1]}"
                entry[t].append(str(v))
        if spf_as_txt and entry.get("TXT") != "TIMEOUT":
            entry.setdefault("TXT", [])
            entry["TXT"] += spf_as_txt
        zones[str(name)] = entry
    return zones


def load_spf_suite(filename: str):
    """[(id, test dict, zones)] for every test of an OpenSPF YAML suite."""
    prefix = filename.split("-tests")[0]
    out = []
    with open(DATA / "spf" / filename, "rb") as f:
        for scenario in yaml.safe_load_all(f):
            zones = spf_zones(scenario.get("zonedata"))
            for name, test in scenario["tests"].items():
                out.append((f"{prefix}-{name}", test, zones))
    return out


def _pub_from_txt(name: str) -> str:
    return (DATA / "dkim" / name).read_text().strip()


def ed25519_public(private_file: str) -> str:
    """The base64 public key of a base64 ed25519 private key (seed) file."""
    import base64

    import nacl.signing

    seed = base64.b64decode((DATA / "dkim" / private_file).read_text().strip())
    return base64.b64encode(bytes(nacl.signing.SigningKey(seed).verify_key)).decode()


def dkim_zones() -> dict:
    """DNS for the dkimpy test data: RFC 8463 example keys and the test keys."""
    return {
        # RFC 8463 appendix A: brisbane is the RFC 8032 7.1 test key, test the RSA key
        "brisbane._domainkey.football.example.com": {
            "TXT": [f"v=DKIM1; k=ed25519; p={ed25519_public('rfc8032_7_1.key')}"]},
        "test._domainkey.football.example.com": {"TXT": [_pub_from_txt("test.txt")]},
        "test._domainkey.example.com": {"TXT": [_pub_from_txt("test.txt")]},
        "ed._domainkey.example.com": {
            "TXT": [f"v=DKIM1; k=ed25519; p={ed25519_public('ed25519test.key')}"]},
        "big._domainkey.example.com": {"TXT": [_pub_from_txt("2048_testkey_wo_markers.pub.txt")]},
        "badk._domainkey.example.com": {"TXT": [_pub_from_txt("badk.txt")]},
        "badversion._domainkey.example.com": {"TXT": [_pub_from_txt("badversion.txt")]},
        "slow._domainkey.example.com": {"TXT": "TIMEOUT"},
    }


def load_arc_suite(filename: str):
    out = []
    kind = "validation" if "validation" in filename else "sign"
    with open(DATA / "arc" / filename, "rb") as f:
        for scenario in yaml.safe_load_all(f):
            for name, test in scenario["tests"].items():
                out.append((f"arc_suite-{kind}-{name}", test, scenario))
    return out
