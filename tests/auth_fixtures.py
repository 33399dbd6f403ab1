"""Helpers shared by the sender-authentication tests (not a test module)."""
from __future__ import annotations

from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parent / "data"


def spf_zones(zonedata: dict) -> dict:
    """The OpenSPF suite's ``zonedata`` as FixtureResolver zones. Follows the suite driver's
    conventions: ``TIMEOUT`` alone times out every type not listed before it, ``NONE`` lists nothing
    (but stops SPF-to-TXT copying), and SPF (type 99) records are copied to TXT when the name has no TXT."""
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
