"""Configuration: TOML files merged over documented defaults.

Sources, lowest precedence first:

1. The annotated defaults shipped in ``filterd/defaults/*.toml`` (core sections) and each plugin's
   ``CONFIG`` text (its own section). Together they are the schema: every key that exists has a
   default there, a comment saying what it does, and its default's type is the type expected.
   ``filterd config example`` prints them all: that is the annotated example config.
2. The main file (``--config PATH``, ``$FILTERD_CONFIG`` or ``/etc/filterd/filterd.toml``).
3. ``conf.d/*.toml`` beside the main file, merged in name order.
4. ``--set section.key=value`` overrides, in the order given.

Conventions in the annotated defaults, used for checking:

- a string default that looks like a duration (``"10s"``, ``"5d"``) requires a duration;
  one that looks like a size (``"10M"``, ``"512K"``) requires a size;
- a trailing comment ``# one of: a, b, c`` restricts the value to those words;
- a table with a key ``"*"`` accepts any key whose value has the type of ``"*"``'s value
  (used for ``[scores]``, ``[actions.domains]`` and the like).

``filterd config check`` reports every problem at once, each as
``FILE:LINE: [section] key: what was expected``.
"""
from __future__ import annotations

import copy
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

DEFAULT_CONFIG_PATH = "/etc/filterd/filterd.toml"

# Keys every plugin section accepts, handled by the plugin host.
PLUGIN_RESERVED = {
    "enabled": True,
    "timeout": "",  # "" = [plugins] timeout
    "on_error": "",  # "" = [plugins] on_error
}

# Units are lower-case on purpose: "5m" is five minutes, "25M" is 25 megabytes.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b)?\s*$", re.I)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"10s"``, ``"5m"``, ``"2h"``, ``"5d"``, ``"1w"`` or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f'expected a duration like "30s", "5m" or "5d", got {value!r}')
    unit = m.group(2).lower() if m.group(2) else None
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_size(value: Any) -> int:
    """Bytes from ``"512K"``, ``"10M"``, ``"1G"``, ``"10MB"`` or a number."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f'expected a size like "512K", "10M" or "1G", got {value!r}')
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def _looks_duration(s: str) -> bool:
    return bool(re.match(r"^\s*\d+(?:\.\d+)?\s*(ms|s|m|h|d|w)\s*$", s))


def _looks_size(s: str) -> bool:
    return bool(re.match(r"^\s*\d+(?:\.\d+)?\s*([KMG]|[kmgKMG]i?[bB])\s*$", s))


@dataclass
class ConfigProblem:
    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line:
            where += f":{self.line}"
        if not self.key:
            return f"{where}: {self.message}"
        if self.key.startswith("rule "):  # rule file problems: [rule NAME] key
            rule, _, key = self.key.partition(".")
            label = f"[{rule}] {key}" if key else f"[{rule}]"
        else:
            section, _, key = self.key.rpartition(".")
            label = f"[{section}] {key}" if section else key
        return f"{where}: {label}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join("config error: " + str(p) for p in problems))


# --------------------------------------------------------------------------------------------
# Defaults (the schema)
# --------------------------------------------------------------------------------------------
@dataclass
class Schema:
    defaults: dict = field(default_factory=dict)
    choices: dict[str, list[str]] = field(default_factory=dict)  # dotted key -> allowed words
    texts: list[tuple[str, str]] = field(default_factory=list)  # (origin, annotated TOML text)

    def add_text(self, origin: str, text: str, section: str | None = None) -> None:
        """Add annotated TOML defaults. With ``section``, the text's top-level keys belong to that
        section (plugins write their CONFIG without the ``[name]`` header; sub-tables use their
        full name, ``[name.sub]``)."""
        if section and not re.search(rf"^\s*\[{re.escape(section)}\]", text, re.M):
            text = f"[{section}]\n" + text.lstrip("\n")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([ConfigProblem(origin, None, section or "",
                                             f"bad defaults: {exc}")]) from exc
        if section:
            data.setdefault(section, {})
            for k, v in PLUGIN_RESERVED.items():
                data[section].setdefault(k, v)
        _deep_merge(self.defaults, data)
        body = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if len(body) > 1 or (body and not section):  # more than the added [section] header
            self.texts.append((origin, text))
        current: list[str] = []
        for line in text.splitlines():
            h = re.match(r"^\s*\[+([^\]]+)\]+", line)
            if h:
                current = [p.strip().strip('"') for p in h.group(1).split(".")]
                continue
            m = re.match(r'^\s*"?([\w*.-]+)"?\s*=.*#\s*one of:\s*(.+)$', line)
            if m:
                key = ".".join(current + [m.group(1)])
                self.choices[key] = [w.strip() for w in m.group(2).split(",") if w.strip()]

    def example(self) -> str:
        out = ["# filterd — annotated example configuration.",
               "# Every setting is shown with its default. Copy what you change into",
               "# /etc/filterd/filterd.toml or a file in /etc/filterd/conf.d/.", ""]
        for origin, text in self.texts:
            out.append(f"# ---- from {origin} ----")
            out.append(text.rstrip())
            out.append("")
        return "\n".join(out) + "\n"


def core_schema() -> Schema:
    schema = Schema()
    files = sorted(resources.files("filterd").joinpath("defaults").iterdir(), key=lambda p: p.name)
    for f in files:
        if f.name.endswith(".toml"):
            schema.add_text(f"filterd/defaults/{f.name}", f.read_text(encoding="utf-8"))
    return schema


def _deep_merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclass
class RawConfig:
    """Merged user settings before validation, remembering where each key came from."""

    data: dict = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # dotted key -> file
    texts: dict[str, str] = field(default_factory=dict)  # file -> text (for line numbers)
    problems: list[ConfigProblem] = field(default_factory=list)
    main_path: str | None = None

    def merge(self, data: dict, origin: str) -> None:
        for key in _dotted_keys(data):
            self.origin[key] = origin
        _deep_merge(self.data, data)


def _dotted_keys(d: dict, prefix: str = "") -> Iterable[str]:
    for k, v in d.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, dict):
            yield from _dotted_keys(v, key + ".")


def _load_file(raw: RawConfig, path: Path) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raw.problems.append(ConfigProblem(str(path), None, "", f"cannot read: {exc.strerror}"))
        return
    raw.texts[str(path)] = text
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raw.problems.append(ConfigProblem(str(path), int(m.group(1)) if m else None, "",
                                          f"not valid TOML: {exc}"))
        return
    raw.merge(data, str(path))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value). The value is read as TOML when it
    parses (numbers, booleans, quoted strings, arrays) and as a plain string otherwise."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.key=value")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise ValueError(f"--set {item!r}: empty key")
    try:  # TOML's own dotted-key syntax, so quoted parts like "a@example.com" work
        doc = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        raise ValueError(f"--set {item!r}: bad key (quote parts with dots or @: "
                         f'actions.recipients."a@example.com".reject=20)') from None
    path = []
    while isinstance(doc, dict) and len(doc) == 1:
        (k, doc), = doc.items()
        path.append(k)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return path, parsed


def load_raw(path: str | None = None, overrides: Iterable[str] = (),
             use_default_path: bool = True) -> RawConfig:
    raw = RawConfig()
    if os.environ.get("FILTERD_NO_DEFAULT_CONFIG"):  # hermetic runs (the test suite)
        use_default_path = False
    main = path or os.environ.get("FILTERD_CONFIG") or (
        DEFAULT_CONFIG_PATH if use_default_path and os.path.exists(DEFAULT_CONFIG_PATH) else None)
    if main:
        p = Path(main)
        raw.main_path = str(p)
        if not p.exists():
            raw.problems.append(ConfigProblem(str(p), None, "", "config file does not exist"))
        else:
            _load_file(raw, p)
            confd = p.parent / "conf.d"
            if confd.is_dir():
                for f in sorted(confd.glob("*.toml")):
                    _load_file(raw, f)
    for item in overrides:
        try:
            keypath, value = parse_override(item)
        except ValueError as exc:
            raw.problems.append(ConfigProblem("--set", None, item.partition("=")[0], str(exc)))
            continue
        d: dict = {}
        cur = d
        for k in keypath[:-1]:
            cur = cur.setdefault(k, {})
        cur[keypath[-1]] = value
        raw.merge(d, "--set")
    return raw


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _type_name(v: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _check_value(key: str, value: Any, default: Any, schema: Schema) -> str | None:
    """None when ``value`` fits ``default``'s type; else what was expected."""
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return None
        return f"expected an integer, got {value!r}"
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        return f"expected a number, got {value!r}"
    if isinstance(default, str):
        if not isinstance(value, str):
            if (_looks_duration(default) or _looks_size(default)) and isinstance(value, int) \
                    and not isinstance(value, bool):
                return None
            return f"expected a string, got {value!r}"
        if key in schema.choices and value not in schema.choices[key]:
            return f"expected one of {', '.join(schema.choices[key])}, got {value!r}"
        try:
            if default and _looks_duration(default):
                parse_duration(value)
            elif default and _looks_size(default):
                parse_size(value)
        except ValueError as exc:
            return str(exc)
        return None
    if isinstance(default, list):
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        if default:
            for item in value:
                err = _check_value(key, item, default[0], schema)
                if err:
                    return "list item: " + err
        return None
    if isinstance(default, dict):
        return None if isinstance(value, dict) else f"expected a table, got {value!r}"
    return None


def _locate(raw: RawConfig, key: str) -> tuple[str, int | None]:
    origin = raw.origin.get(key, raw.main_path or "<config>")
    text = raw.texts.get(origin)
    if not text:
        return origin, None
    parts = key.split(".")
    leaf = parts[-1]
    section = parts[:-1]
    in_section = not section
    for n, line in enumerate(text.splitlines(), 1):
        h = re.match(r"^\s*\[+([^\]]+)\]+", line)
        if h:
            names = [p.strip().strip('"') for p in h.group(1).split(".")]
            in_section = names == section
            if names == parts:
                return origin, n
            continue
        if re.match(rf'^\s*"?{re.escape(leaf)}"?\s*=', line) and in_section:
            return origin, n
        dotted = ".".join(parts)
        if re.match(rf"^\s*{re.escape(dotted)}\s*=", line):
            return origin, n
    return origin, None


def validate(raw: RawConfig, schema: Schema) -> tuple[dict, list[ConfigProblem]]:
    """Return (effective config, problems). Effective = defaults overlaid with valid user keys."""
    problems = list(raw.problems)
    effective = copy.deepcopy(schema.defaults)
    _strip_wildcards(effective)

    def walk(user: dict, defaults: dict, out: dict, prefix: str) -> None:
        for k, v in user.items():
            key = f"{prefix}{k}"
            if k in defaults:
                d = defaults[k]
            elif "*" in defaults:
                d = defaults["*"]
            else:
                known = ", ".join(sorted(x for x in defaults if x != "*"))[:300]
                file, line = _locate(raw, key)
                problems.append(ConfigProblem(file, line, key,
                                              f"unknown setting (known here: {known})"))
                continue
            if isinstance(d, dict) and not d and isinstance(v, dict):
                out[k] = copy.deepcopy(v)  # an empty default table: free-form contents
                continue
            if isinstance(d, dict) and isinstance(v, dict):
                sub = out.setdefault(k, {})
                if not isinstance(sub, dict):
                    sub = out[k] = {}
                walk(v, d, sub, key + ".")
                continue
            err = _check_value(key, v, d, schema)
            if err:
                file, line = _locate(raw, key)
                problems.append(ConfigProblem(file, line, key, err))
                continue
            out[k] = copy.deepcopy(v)

    walk(raw.data, schema.defaults, effective, "")
    return effective, problems


def _strip_wildcards(d: dict) -> None:
    d.pop("*", None)
    for v in d.values():
        if isinstance(v, dict):
            _strip_wildcards(v)


# --------------------------------------------------------------------------------------------
# The effective configuration
# --------------------------------------------------------------------------------------------
_UNKNOWN, _ABSENT = object(), object()  # Config.get: not looked up yet; not in the config


class Config:
    """The checked, effective configuration. ``cfg["dns"]["timeout"]`` or
    ``cfg.get("dns.timeout")``; ``cfg.duration("dns.timeout")`` and
    ``cfg.size("smtp.max_message_size")`` parse units."""

    def __init__(self, data: dict, schema: Schema, raw: RawConfig):
        self.data = data
        self.schema = schema
        self.raw = raw
        # dotted key -> what it names (or _ABSENT): plugins ask for the same few settings on
        # every message. A Config is never changed once made (a reload makes a new one).
        self._found: dict[str, Any] = {}

    def __getitem__(self, section: str) -> Any:
        return self.data[section]

    def section(self, name: str) -> dict:
        return self.data.get(name, {})

    def get(self, dotted: str, default: Any = None) -> Any:
        cur = self._found.get(dotted, _UNKNOWN)
        if cur is _UNKNOWN:
            cur = self.data
            for part in dotted.split("."):
                if not isinstance(cur, dict) or part not in cur:
                    cur = _ABSENT
                    break
                cur = cur[part]
            self._found[dotted] = cur
        return default if cur is _ABSENT else cur

    def duration(self, dotted: str) -> float:
        return parse_duration(self.get(dotted))

    def size(self, dotted: str) -> int:
        return parse_size(self.get(dotted))

    @property
    def state_dir(self) -> Path:
        return Path(self.get("server.state_dir"))

    def path(self, dotted: str, default_name: str) -> Path:
        """A file path setting; ``""`` means ``<state_dir>/<default_name>``."""
        v = self.get(dotted) or ""
        return Path(v) if v else self.state_dir / default_name


def load(path: str | None = None, overrides: Iterable[str] = (), plugin_texts=(),
         use_default_path: bool = True, strict: bool = True) -> Config:
    """Load and check the configuration. ``plugin_texts`` is ``[(plugin name, CONFIG text)]``.
    With ``strict`` (the default) any problem raises :class:`ConfigError` listing all of them."""
    raw = load_raw(path, overrides, use_default_path)
    schema = core_schema()
    for name, text in plugin_texts:
        schema.add_text(f"plugin {name}", text or "", section=name)
    data, problems = validate(raw, schema)
    if problems and strict:
        raise ConfigError(problems)
    cfg = Config(data, schema, raw)
    cfg.problems = problems  # type: ignore[attr-defined]
    return cfg
