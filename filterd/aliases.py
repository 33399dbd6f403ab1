"""Alias maps and distribution lists: loading and recursive expansion.

Sources (all merged into one map of lower-cased keys → targets):

- a Postfix ``aliases(5)`` file: ``name: target, target`` with continuation lines, comments,
  ``:include:/path`` lists. Unqualified names apply to each configured domain; targets without
  ``@`` stay in the domain of the address being expanded. Command (``|cmd``) and file
  (``/path``) targets are refused: a gateway never runs programs or writes files for senders.
- a TOML file or inline table: ``"sales@example.com" = ["ann@example.com", "bob"]``;
- distribution lists: ``members`` inline or ``members_file`` (one address a line).

Expansion is recursive with loop detection (an address met again on the same path is dropped,
and reported), a depth limit and a limit on the number of final recipients. Duplicates are
removed, keeping first-seen order.
"""
from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("filterd.aliases")


class AliasError(Exception):
    pass


@dataclass
class Expansion:
    recipients: list[str]
    loops: list[str] = field(default_factory=list)
    truncated: bool = False
    too_deep: bool = False


def _split_targets(value: str) -> list[str]:
    return [t.strip().strip('"') for t in value.split(",") if t.strip()]


def parse_postfix_aliases(text: str, origin: str = "<aliases>") -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {}
    logical: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((n, line.strip()))
    for n, line in logical:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise AliasError(f"{origin}:{n}: expected 'name: target, ...', got {line!r}")
        targets = []
        for t in _split_targets(value):
            if t.startswith(":include:"):
                path = Path(t[len(":include:"):].strip())
                try:
                    targets += [x.strip() for x in path.read_text().replace(",", "\n").splitlines()
                                if x.strip() and not x.strip().startswith("#")]
                except OSError as exc:
                    raise AliasError(f"{origin}:{n}: cannot read {path}: {exc.strerror}") from exc
            elif t.startswith(("|", "/")):
                log.warning("%s:%d: alias %s: command/file target %r refused", origin, n,
                            name.strip(), t)
            else:
                targets.append(t)
        entries.setdefault(name.strip().lower().strip('"'), []).extend(targets)
    return entries


def read_members_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AliasError(f"members_file {path}: {exc.strerror}") from exc
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines()
            if ln.split("#", 1)[0].strip()]


class AliasMap:
    def __init__(self, entries: dict[str, list[str]] | None = None, domains=(),
                 catch_all: dict[str, str] | None = None, plus_separator: str = "+",
                 max_depth: int = 10, max_recipients: int = 1000):
        self.entries: dict[str, list[str]] = {}
        self.unqualified: dict[str, list[str]] = {}
        for k, v in (entries or {}).items():
            self.add(k, v)
        self.domains = {d.lower() for d in domains}
        self.catch_all = {k.lower(): v for k, v in (catch_all or {}).items() if v}
        self.plus = plus_separator
        self.max_depth = max_depth
        self.max_recipients = max_recipients

    def add(self, name: str, targets: list[str]) -> None:
        name = name.lower()
        table = self.entries if "@" in name else self.unqualified
        table.setdefault(name, [])
        for t in targets:
            if t not in table[name]:
                table[name].append(t)

    def _strip_plus(self, address: str) -> str:
        local, _, domain = address.rpartition("@")
        if self.plus and self.plus in local:
            local = local.split(self.plus, 1)[0]
        return f"{local}@{domain}"

    def lookup(self, address: str) -> list[str] | None:
        """Direct targets of ``address`` (qualified), or None when it is not an alias."""
        addr = address.lower()
        local, _, domain = addr.rpartition("@")
        candidates = [addr]
        base = self._strip_plus(addr)
        if base != addr:
            candidates.append(base)
        for c in candidates:
            if c in self.entries:
                return [self._qualify(t, domain) for t in self.entries[c]]
            cl = c.rpartition("@")[0]
            if cl in self.unqualified and (not self.domains or domain in self.domains):
                return [self._qualify(t, domain) for t in self.unqualified[cl]]
        return None

    def is_alias(self, address: str) -> bool:
        return self.lookup(address) is not None

    @staticmethod
    def _qualify(target: str, domain: str) -> str:
        return target if "@" in target else f"{target}@{domain}"

    def expand(self, address: str) -> Expansion:
        out: list[str] = []
        seen_final: set[str] = set()
        exp = Expansion(out)

        def walk(addr: str, path: tuple[str, ...]) -> None:
            if len(out) >= self.max_recipients:
                exp.truncated = True
                return
            key = addr.lower()
            if key in path or self._strip_plus(key) in path:
                exp.loops.append(" -> ".join(path + (key,)))
                return
            targets = self.lookup(addr)
            if targets is None and not path:
                domain = key.rpartition("@")[2]
                if domain in self.catch_all:
                    targets = [self._qualify(self.catch_all[domain], domain)]
            if targets is None:
                if key not in seen_final:
                    seen_final.add(key)
                    out.append(addr)
                return
            if len(path) >= self.max_depth:
                exp.too_deep = True
                return
            for t in targets:
                if t.lower() == key:  # "user: user, backup": also deliver to the address itself
                    if key not in seen_final:
                        seen_final.add(key)
                        out.append(addr)
                    continue
                walk(t, path + (key,))

        walk(address, ())
        return exp


def load_alias_map(options: dict) -> AliasMap:
    entries: dict[str, list[str]] = {}

    def merge(d: dict[str, list[str]]) -> None:
        for k, v in d.items():
            entries.setdefault(k.lower(), []).extend(v)

    if options.get("file"):
        path = Path(options["file"])
        try:
            merge(parse_postfix_aliases(path.read_text(encoding="utf-8"), str(path)))
        except OSError as exc:
            raise AliasError(f"[aliases] file {path}: {exc.strerror}") from exc
    if options.get("toml_file"):
        path = Path(options["toml_file"])
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise AliasError(f"[aliases] toml_file {path}: {exc}") from exc
        merge({k: ([v] if isinstance(v, str) else list(v))
               for k, v in (data.get("aliases", data)).items()})
    merge({k: ([v] if isinstance(v, str) else list(v))
           for k, v in (options.get("map") or {}).items()})
    for name, spec in (options.get("lists") or {}).items():
        members = list(spec.get("members") or [])
        if spec.get("members_file"):
            members += read_members_file(spec["members_file"])
        merge({name: members})
    return AliasMap(entries, options.get("domains") or (), options.get("catch_all") or {},
                    options.get("plus_separator", "+"), int(options.get("max_depth", 10)),
                    int(options.get("max_recipients", 1000)))
