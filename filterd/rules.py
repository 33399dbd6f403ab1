"""The rules engine: rules are data in TOML files.

Files: the shipped ``rules/*.toml`` (unless ``[rules] shipped = false``), then every ``*.toml``
of ``[rules] site_dir`` in name order. A site rule with the name of a shipped rule replaces it
(``enabled = false`` switches it off). Each file may also hold ``[scores]`` (symbol weights) and
``[actions]`` (thresholds); later files override earlier ones and the main config overrides all.

A rule::

    [[rule]]
    name = "SUBJ_ALL_CAPS"            # the symbol it emits (A-Z, 0-9, _); "__X" = helper, silent
    description = "Subject is all capitals"
    score = 1.5
    header = "Subject"                # conditions: every one given must match
    match = '^[^a-z]{12,}$'

Conditions:

- ``sender``, ``recipient``, ``helo`` — regex on the envelope sender / each recipient / HELO
  (a rule with ``recipient`` fires per recipient and scores for those recipients only);
- ``client_ip`` — an address or CIDR, or a list of them;
- ``header`` + ``match`` — regex on the decoded value of any header of that name
  (without ``match``: the header exists); ``header = "*"`` searches every header;
- ``body`` — regex on the decoded text of every text part (HTML reduced to text);
- ``rawbody`` — regex on the raw message bytes (after the headers), as latin-1 text;
- ``uri`` — regex on URLs found in the text; ``uri_domain`` — domains (a URL host matches the
  domain and its subdomains);
- ``attachment_name`` — regex on attachment file names; ``attachment_type`` — MIME type globs;
- ``size_over`` / ``size_under`` — message size (``"500K"``, ``"10M"`` or bytes);
- ``all`` / ``any`` — lists of other rule names; ``not`` — one rule name (meta rules).

``flags`` holds regex flags: ``i`` (ignore case), ``m`` (multi-line), ``s`` (dot matches all).
``body`` and ``rawbody`` patterns run on RE2 when RE2 accepts them (linear time; ``\\w``, ``\\b``,
``\\d`` match ASCII only there), else on Python's re (lookarounds, backreferences).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
import threading
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ConfigError, ConfigProblem, parse_size
from .rewrite import split_message

log = logging.getLogger("filterd.rules")

NAME_RE = re.compile(r"^_{0,2}[A-Z0-9][A-Z0-9_]*$")
RULE_KEYS = {
    "name", "description", "score", "enabled", "flags",
    "sender", "recipient", "helo", "client_ip", "header", "match", "body", "rawbody", "uri",
    "uri_domain", "attachment_name", "attachment_type", "size_over", "size_under",
    "all", "any", "not",
}
FILE_KEYS = {"rule", "scores", "actions"}
MAX_REGEX_TEXT = 512 * 1024  # text a body/raw regex looks at, per message


@dataclass
class Rule:
    name: str
    origin: str
    description: str = ""
    score: float = 0.0
    enabled: bool = True
    per_recipient: bool = False
    conds: dict[str, Any] = field(default_factory=dict)
    meta_all: list[str] = field(default_factory=list)
    meta_any: list[str] = field(default_factory=list)
    meta_not: str = ""
    # body/rawbody patterns RE2 accepted, as RE2 compiles them (for the rule set's _TextSet)
    sources: dict[str, str] = field(default_factory=dict)
    # the conditions as functions of a _View, in the order they are tried (built on first use)
    checks: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def is_meta(self) -> bool:
        return bool(self.meta_all or self.meta_any or self.meta_not)

    @property
    def silent(self) -> bool:
        return self.name.startswith("__")


class RuleError(ConfigError):
    pass


def _re2_source(pattern: str, flags: int) -> str:
    """The pattern as RE2 compiles it: Python's i/m/s flags written inline."""
    inline = "".join(ch for ch, f in (("i", re.I), ("m", re.M), ("s", re.S)) if flags & f)
    return f"(?{inline}){pattern}" if inline else pattern


def _re2_options():
    import re2

    opts = re2.Options()
    opts.log_errors = False  # a pattern RE2 refuses falls back quietly
    return opts


def _text_scanner(pattern: str, flags: int):
    """A compiled pattern for scanning whole message texts (``body``, ``rawbody``): RE2 (linear
    time, about 5x faster than Python's re on these texts, and immune to catastrophic
    backtracking in a site's own rules) when RE2 accepts the pattern, else Python's re (RE2 has
    no lookarounds or backreferences). Under RE2, ``\\w``, ``\\b`` and ``\\d`` are ASCII-only."""
    try:
        import re2
    except ImportError:  # pragma: no cover - google-re2 is a dependency; keep working without
        return re.compile(pattern, flags)
    try:
        return re2.compile(_re2_source(pattern, flags), _re2_options())
    except Exception:  # noqa: BLE001 - re2.error: unsupported syntax
        return re.compile(pattern, flags)


class _TextSet:
    """The ``body`` (or ``rawbody``) patterns of a rule set that RE2 compiled, matched in ONE
    pass over the text instead of one search per rule: with Hyperscan when it is installed and
    takes every pattern (as rspamd does: a 5 KB text in a fifth of RE2's time), else with an
    RE2::Set (a single DFA scan finds every pattern that matches, whatever the number of rules).

    Both scan UTF-8 with ASCII ``\\w``, ``\\b`` and ``\\d``. Hyperscan is only given valid UTF-8
    (a text with lone surrogates from a broken charset goes to RE2, which takes any bytes).

    Index 0 is an empty pattern, which matches every text: a result without it means RE2 could
    not finish the scan (its memory budget, :data:`SET_MAX_MEM`) and the caller then searches
    rule by rule, so a failed scan never reads as "no rule matched"."""

    SET_MAX_MEM = 64 << 20  # RE2's budget for the set's program and DFA cache (default 8 MB)

    def __init__(self, key: str, rules: list[Rule]):
        import re2

        self.index: dict[str, int] = {}  # rule name -> pattern index
        self.hs: _HyperscanSet | None = None
        opts = _re2_options()
        opts.max_mem = self.SET_MAX_MEM
        self.set = re2.Set.SearchSet(opts)
        if self.set.Add("") != 0:
            raise RuntimeError("RE2 set: the sentinel pattern must be index 0")
        sources: dict[int, str] = {}
        for r in rules:
            source = r.sources.get(key)
            if source is not None:
                try:
                    i = self.index[r.name] = self.set.Add(source)
                    sources[i] = source
                except re2.error:  # pragma: no cover - it compiled alone; searched alone then
                    pass
        self.set.Compile()
        if self.hits("") is None:  # pragma: no cover - a budget too small for any scan
            raise RuntimeError("RE2 set cannot scan within its memory budget")
        self.hs = _HyperscanSet.build(sources)

    def hits(self, text: str | bytes, valid_utf8: bool = True) -> set[int] | None:
        """Indexes of the patterns found in ``text`` (index 0 always); None when the scan
        failed. ``valid_utf8``: ``text`` (bytes) is valid UTF-8."""
        if self.hs is not None and valid_utf8:
            found = self.hs.scan(text if type(text) is bytes else text.encode())
            if found is not None:
                return found
        found = self.set.Match(text)
        if not found or 0 not in found:
            return None
        return set(found)


class _HyperscanSet:
    """A Hyperscan database of a :class:`_TextSet`'s patterns (block mode, one report per
    pattern), with a scratch space per thread."""

    FLAGS = ("HS_FLAG_UTF8", "HS_FLAG_ALLOWEMPTY", "HS_FLAG_SINGLEMATCH")

    def __init__(self, hyperscan, db):
        self.hyperscan = hyperscan
        self.db = db
        self.local = threading.local()

    @classmethod
    def build(cls, sources: dict[int, str]) -> "_HyperscanSet | None":
        """None when Hyperscan is not installed, or refuses one of the patterns (its syntax is
        PCRE's, not RE2's: then RE2 scans them all, one engine answering for the whole set)."""
        if not sources:
            return None
        try:
            import hyperscan
        except ImportError:
            return None
        flags = 0
        for name in cls.FLAGS:
            flags |= getattr(hyperscan, name)
        ids = sorted(sources)
        try:
            db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            db.compile(expressions=[sources[i].encode() for i in ids], ids=ids,
                       elements=len(ids), flags=[flags] * len(ids))
        except Exception as exc:  # noqa: BLE001 - hyperscan.error: a pattern it cannot take
            log.info("rules: body patterns scanned with RE2, not Hyperscan (%s)", exc)
            return None
        return cls(hyperscan, db)

    def scan(self, data: bytes) -> set[int] | None:
        scratch = getattr(self.local, "scratch", None)
        if scratch is None:
            scratch = self.local.scratch = self.hyperscan.Scratch(self.db)
        found = {0}
        try:
            self.db.scan(data, match_event_handler=lambda i, *_: found.add(i), scratch=scratch)
        except Exception:  # noqa: BLE001 - hyperscan.error: RE2 scans this text instead
            log.warning("rules: Hyperscan could not scan a text; RE2 scans it", exc_info=True)
            return None
        return found


def _flags(text: str) -> int:
    f = 0
    for ch in text or "":
        f |= {"i": re.I, "m": re.M, "s": re.S}.get(ch, 0)
    return f


def _compile_rule(entry: Any, origin: str, index: int,
                  problems: list[ConfigProblem]) -> Rule | None:
    where = f"rule #{index}"
    if not isinstance(entry, dict):
        problems.append(ConfigProblem(origin, None, where, "each [[rule]] must be a table"))
        return None
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        problems.append(ConfigProblem(origin, None, f"{where}.name",
                                      f"expected a rule name like SUBJ_ALL_CAPS, got {name!r}"))
        return None
    where = f"rule {name}"
    ok = True

    def bad(key: str, msg: str) -> None:
        nonlocal ok
        ok = False
        problems.append(ConfigProblem(origin, None, f"{where}.{key}", msg))

    for k in entry:
        if k not in RULE_KEYS:
            bad(k, f"unknown rule key (known: {', '.join(sorted(RULE_KEYS))})")
    rule = Rule(name, origin, str(entry.get("description", "")))
    score = entry.get("score", 0.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        bad("score", f"expected a number, got {score!r}")
    else:
        rule.score = float(score)
    rule.enabled = bool(entry.get("enabled", True))
    flags = _flags(str(entry.get("flags", "")))
    for key in ("sender", "recipient", "helo", "match", "body", "rawbody", "uri",
                "attachment_name"):
        if key in entry:
            pattern = entry[key]
            if not isinstance(pattern, str):
                bad(key, f"expected a regular expression string, got {pattern!r}")
                continue
            try:
                rule.conds[key] = re.compile(pattern, flags)  # Python's re validates the syntax
                if key in ("body", "rawbody"):
                    rule.conds[key] = _text_scanner(pattern, flags)
                    if type(rule.conds[key]) is not re.Pattern:  # RE2 took it
                        rule.sources[key] = _re2_source(pattern, flags)
            except re.error as exc:
                bad(key, f"bad regular expression {pattern!r}: {exc}")
    if "match" in entry and "header" not in entry:
        bad("match", "'match' needs a 'header' to match against")
    if "header" in entry:
        if not isinstance(entry["header"], str) or not entry["header"]:
            bad("header", f"expected a header name, got {entry['header']!r}")
        else:
            rule.conds["header"] = entry["header"].lower()
    if "client_ip" in entry:
        nets = entry["client_ip"] if isinstance(entry["client_ip"], list) else [entry["client_ip"]]
        parsed = []
        for n in nets:
            try:
                parsed.append(ipaddress.ip_network(str(n), strict=False))
            except ValueError:
                bad("client_ip", f"expected an IP address or CIDR, got {n!r}")
        rule.conds["client_ip"] = parsed
    for key in ("uri_domain", "attachment_type"):
        if key in entry:
            v = entry[key] if isinstance(entry[key], list) else [entry[key]]
            if not all(isinstance(x, str) for x in v):
                bad(key, f"expected a string or a list of strings, got {entry[key]!r}")
            else:
                rule.conds[key] = [x.lower().strip(".") for x in v]
    for key in ("size_over", "size_under"):
        if key in entry:
            try:
                rule.conds[key] = parse_size(entry[key])
            except ValueError as exc:
                bad(key, str(exc))
    for key in ("all", "any"):
        if key in entry:
            v = entry[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                bad(key, f"expected a list of rule names, got {v!r}")
            else:
                setattr(rule, f"meta_{key}", v)
    if "not" in entry:
        if not isinstance(entry["not"], str):
            bad("not", f"expected one rule name, got {entry['not']!r}")
        else:
            rule.meta_not = entry["not"]
    if not rule.conds and not rule.is_meta:
        bad("name", "rule has no condition (sender, header, body, uri, all, ...)")
    rule.per_recipient = "recipient" in rule.conds
    return rule if ok else None


def rule_files(config) -> list[Path]:
    files: list[Path] = []
    section = config.section("rules")
    if section.get("shipped", True):
        shipped = resources.files("filterd_rules")
        files += sorted((Path(str(f)) for f in shipped.iterdir() if f.name.endswith(".toml")),
                        key=lambda p: p.name)
    site = section.get("site_dir") or ""
    if site:
        d = Path(site)
        if d.is_dir():
            files += sorted(d.glob("*.toml"))
    return files


def _read(path: Path, problems: list[ConfigProblem]) -> dict:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(ConfigProblem(str(path), None, "", f"cannot read rule file: {exc}"))
        return {}
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        problems.append(ConfigProblem(str(path), int(m.group(1)) if m else None, "",
                                      f"not valid TOML: {exc}"))
        return {}
    for k in data:
        if k not in FILE_KEYS:
            problems.append(ConfigProblem(str(path), _line_of(path, k), k,
                                          "unknown table in rule file (expected [[rule]], "
                                          "[scores] or [actions])"))
    return data


def _line_of(path: Path, needle: str) -> int | None:
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if needle in line:
                return n
    except OSError:
        pass
    return None


class RuleSet:
    def __init__(self, rules: list[Rule]):
        self.rules = [r for r in rules if r.enabled]
        self.by_name = {r.name: r for r in self.rules}
        self.simple = [r for r in self.rules if not r.is_meta]
        self.meta = _meta_order([r for r in self.rules if r.is_meta], self.by_name)
        # body and rawbody patterns in one pass each when several rules scan that text
        self.text_sets: dict[str, _TextSet] = {}
        for key in ("body", "rawbody"):
            n = sum(1 for r in self.rules if key in r.sources)
            if n:
                try:
                    ts = _TextSet(key, self.rules)
                except Exception as exc:  # noqa: BLE001 - rules then search one by one
                    log.warning("rules: %s patterns are searched one by one (RE2 set: %s)",
                                key, exc)
                    continue
                # one pattern alone: a set is worth it with Hyperscan (RE2 searches a lone
                # pattern faster than its set scans: literal prefixes are skipped to)
                if n >= 2 or ts.hs is not None:
                    self.text_sets[key] = ts

    def __len__(self) -> int:
        return len(self.rules)

    def evaluate(self, ctx) -> tuple[dict[str, bool], dict[str, set[str]]]:
        """Returns (message-level hits, per-recipient hits {rule: {addresses}})."""
        hits: dict[str, bool] = {}
        rcpt_hits: dict[str, set[str]] = {}
        view = _View(ctx, self.text_sets)
        match = _match_message
        for rule in self.simple:
            if rule.per_recipient:
                if not match(rule, view):
                    hits[rule.name] = False
                    continue
                addrs = {r.address for r in ctx.recipients
                         if rule.conds["recipient"].search(r.address)}
                rcpt_hits[rule.name] = addrs
                hits[rule.name] = bool(addrs)
            else:
                hits[rule.name] = match(rule, view)
        for rule in self.meta:
            ok = True
            if rule.meta_all:
                ok = all(hits.get(n, False) for n in rule.meta_all)
            if ok and rule.meta_any:
                ok = any(hits.get(n, False) for n in rule.meta_any)
            if ok and rule.meta_not:
                ok = not hits.get(rule.meta_not, False)
            if ok and rule.conds:
                ok = _match_message(rule, view)
            hits[rule.name] = ok
        return hits, rcpt_hits


def _meta_order(metas: list[Rule], by_name: dict[str, Rule]) -> list[Rule]:
    order: list[Rule] = []
    state: dict[str, int] = {}

    def visit(rule: Rule, chain: list[str]) -> None:
        if state.get(rule.name) == 2:
            return
        if state.get(rule.name) == 1:
            raise RuleError([ConfigProblem(rule.origin, None, f"rule {rule.name}",
                                           "meta rules form a loop: " + " -> ".join(chain))])
        state[rule.name] = 1
        for dep in rule.meta_all + rule.meta_any + ([rule.meta_not] if rule.meta_not else []):
            d = by_name.get(dep)
            if d is not None and d.is_meta:
                visit(d, chain + [dep])
        state[rule.name] = 2
        order.append(rule)

    for r in metas:
        visit(r, [r.name])
    return order


_UNSET = object()


class _View:
    """Lazily computed message facts, shared by all rules of one evaluation."""

    def __init__(self, ctx, text_sets: dict[str, _TextSet] | None = None):
        self.ctx = ctx
        self.msg = ctx.message
        self.text_sets = text_sets or {}
        self._texts: dict[str, str] = {}  # body / rawbody
        self._encoded: dict[str, bytes] = {}  # the same as UTF-8, as RE2 searches it
        self._hits: dict[str, Any] = {}  # body / rawbody -> the set scan's pattern indexes
        self._invalid: set[str] = set()  # texts whose UTF-8 is not valid (surrogates)

    def found(self, rule: Rule, key: str) -> bool:
        """Does ``rule``'s ``body``/``rawbody`` pattern match (one set scan answers for all the
        rules of the set; a pattern outside it, or a failed scan, is searched alone)?"""
        ts = self.text_sets.get(key)
        if ts is not None:
            i = ts.index.get(rule.name)
            if i is not None:
                hits = self._hits.get(key, _UNSET)
                if hits is _UNSET:
                    data = self.encoded(key)
                    hits = self._hits[key] = ts.hits(data, key not in self._invalid)
                if hits is not None:
                    return i in hits
        rx = rule.conds[key]
        if type(rx) is re.Pattern:
            return rx.search(self.text if key == "body" else self.rawbody) is not None
        return rx.search(self.encoded(key)) is not None  # RE2: the text encoded once

    def encoded(self, key: str) -> bytes:
        """The ``body``/``rawbody`` text as UTF-8, once per message (RE2 encodes a str it is
        given on every search)."""
        b = self._encoded.get(key)
        if b is None:
            text = self.text if key == "body" else self.rawbody
            try:
                b = text.encode()
            except UnicodeEncodeError:  # lone surrogates (undecodable bytes): RE2 takes these
                b = text.encode("utf-8", "surrogatepass")
                self._invalid.add(key)
            self._encoded[key] = b
        return b

    @property
    def text(self) -> str:
        t = self._texts.get("body")
        if t is None:
            t = self._texts["body"] = (self.msg.parsed.text[:MAX_REGEX_TEXT] if self.msg
                                       else "")
        return t

    @property
    def header_index(self) -> dict[str, list[str]]:
        """Lower-cased header name -> its values, in order (one pass for all header rules)."""
        return self.msg.parsed.header_index

    @property
    def rawbody(self) -> str:
        t = self._texts.get("rawbody")
        if t is None:
            t = self._texts["rawbody"] = (
                split_message(self.msg.raw)[2][:MAX_REGEX_TEXT].decode("latin-1")
                if self.msg else "")
        return t


def _match_message(rule: Rule, v: _View) -> bool:
    checks = rule.checks
    if checks is None:
        checks = rule.checks = _compile_checks(rule)
    for check in checks:
        if not check(v):
            return False
    return True


def _compile_checks(rule: Rule) -> tuple:
    """``rule``'s message conditions as functions of a :class:`_View`, in a fixed order (cheap
    envelope facts first, text scans last): a rule is a match when all say True."""
    c = rule.conds
    out: list = []
    if "sender" in c:
        sender = c["sender"].search
        out.append(lambda v: sender(v.ctx.transaction.mail_from or "") is not None)
    if "helo" in c:
        helo = c["helo"].search
        out.append(lambda v: helo(v.ctx.session.helo or "") is not None)
    if "client_ip" in c:
        nets = c["client_ip"]

        def client_ip(v):
            ip = v.ctx.session.ip
            return ip is not None and any(ip.version == n.version and ip in n for n in nets)
        out.append(client_ip)
    if "size_over" in c:
        over = c["size_over"]
        out.append(lambda v: bool(v.msg and v.msg.size > over))
    if "size_under" in c:
        under = c["size_under"]
        out.append(lambda v: bool(v.msg and v.msg.size < under))
    if "header" in c:
        name, m = c["header"], c.get("match")
        search = m.search if m is not None else None

        def header(v):
            msg = v.msg
            if msg is None:
                return False
            values = ([val for _, val in msg.parsed.headers] if name == "*"
                      else v.header_index.get(name, ()))
            if search is not None:
                return any(search(val) for val in values)
            return bool(values)
        out.append(header)
    for key in ("body", "rawbody"):
        if key in c:
            out.append(lambda v, key=key: v.found(rule, key))
    if "uri" in c:
        uri = c["uri"].search
        out.append(lambda v: bool(v.msg and any(uri(u) for u in v.msg.parsed.urls)))
    if "uri_domain" in c:
        domains = c["uri_domain"]

        def uri_domain(v):
            hosts = v.msg.parsed.url_hosts if v.msg else []
            return any(h == d or h.endswith("." + d) for h in hosts for d in domains)
        out.append(uri_domain)
    if "attachment_name" in c:
        aname = c["attachment_name"].search

        def attachment_name(v):
            names = [a.filename for a in v.msg.parsed.attachments] if v.msg else []
            return any(aname(n) for n in names if n)
        out.append(attachment_name)
    if "attachment_type" in c:
        globs = c["attachment_type"]

        def attachment_type(v):
            types = [a.content_type for a in v.msg.parsed.attachments] if v.msg else []
            return any(fnmatch.fnmatch(t, g) for t in types for g in globs)
        out.append(attachment_type)
    return tuple(out)


def load_rules(config, strict: bool = True) -> tuple[RuleSet, list[ConfigProblem]]:
    """All rule files in order; later rules replace earlier ones of the same name."""
    problems: list[ConfigProblem] = []
    rules: dict[str, Rule] = {}
    for path in rule_files(config):
        data = _read(path, problems)
        entries = data.get("rule", [])
        if not isinstance(entries, list):
            problems.append(ConfigProblem(str(path), None, "rule",
                                          "use [[rule]] (an array of tables)"))
            continue
        for i, entry in enumerate(entries, 1):
            rule = _compile_rule(entry, str(path), i, problems)
            if rule is not None:
                rules[rule.name] = rule
    for p in problems:
        if p.line is None and p.key.startswith("rule "):
            name = p.key.split(".")[0][5:]
            p.line = _line_of(Path(p.file), f'"{name}"') if p.file else None
    for r in rules.values():
        for dep in r.meta_all + r.meta_any + ([r.meta_not] if r.meta_not else []):
            if dep not in rules:
                problems.append(ConfigProblem(r.origin, _line_of(Path(r.origin), f'"{r.name}"'),
                                              f"rule {r.name}", f"refers to unknown rule {dep!r}"))
    try:
        ruleset = RuleSet(list(rules.values()))
    except RuleError as exc:
        problems.extend(exc.problems)
        ruleset = RuleSet([r for r in rules.values() if not r.is_meta])
    if problems and strict:
        raise RuleError(problems)
    return ruleset, problems


def load_policy_tables(config) -> tuple[dict, dict]:
    """Symbol weights and action thresholds: config defaults, then rule files in order, then
    what the user set in the config (which wins)."""
    scores: dict[str, float] = {}
    actions: dict = {k: v for k, v in config.section("actions").items()}
    sink: list[ConfigProblem] = []
    for path in rule_files(config):
        data = _read(path, sink)
        for k, v in (data.get("scores") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                scores[k] = float(v)
        _merge_actions(actions, data.get("actions") or {})
    user = config.raw.data if getattr(config, "raw", None) else {}
    scores.update({k: float(v) for k, v in (user.get("scores") or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
    _merge_actions(actions, user.get("actions") or {})
    return scores, actions


def _merge_actions(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict):
            sub = base.setdefault(k, {})
            for kk, vv in v.items():
                if isinstance(vv, dict):
                    sub.setdefault(kk, {}).update(vv)
                else:
                    sub[kk] = vv
        else:
            base[k] = v
