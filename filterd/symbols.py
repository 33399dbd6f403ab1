"""Symbols (named findings), their configured scores, and the one function that turns a total
score into an action.

Plugins and rules report *symbols*; the weight a symbol carries is configuration, not code: the
``[scores]`` tables of the rule files and of the config override the default weight a plugin
suggests. Thresholds live in ``[actions]`` and may be overridden per recipient domain
(``[actions.domains."example.com"]``) and per recipient (``[actions.recipients."a@example.com"]``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .verdict import Action


@dataclass
class Symbol:
    name: str
    score: float = 0.0
    options: list[str] = field(default_factory=list)
    description: str = ""
    source: str = ""

    def to_dict(self) -> dict:
        d = {"name": self.name, "score": round(self.score, 3)}
        if self.options:
            d["options"] = list(self.options)
        if self.description:
            d["description"] = self.description
        if self.source:
            d["source"] = self.source
        return d


class SymbolSet:
    """Symbols found for a message (or for one recipient). Adding a symbol twice merges options
    and keeps the larger absolute weight, so a plugin that fires per part does not count N times."""

    def __init__(self, scores: "ScoreTable | None" = None):
        self._by_name: dict[str, Symbol] = {}
        self.scores = scores

    def add(self, name: str, score: float | None = None, options=None, description: str = "",
            source: str = "") -> Symbol:
        weight = self.scores.weight(name, score) if self.scores else (score or 0.0)
        opts = [str(o) for o in (options or [])]
        sym = self._by_name.get(name)
        if sym is None:
            sym = Symbol(name, weight, opts, description, source)
            self._by_name[name] = sym
        else:
            if abs(weight) > abs(sym.score):
                sym.score = weight
            for o in opts:
                if o not in sym.options:
                    sym.options.append(o)
        return sym

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Symbol:
        return self._by_name[name]

    def get(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return list(self._by_name)

    @property
    def total(self) -> float:
        return sum(s.score for s in self._by_name.values())


class ScoreTable:
    """Configured symbol weights: name -> weight. A symbol with no configured weight keeps the
    weight its reporter suggested (or 0)."""

    def __init__(self, weights: dict[str, float] | None = None):
        self.weights = dict(weights or {})

    def weight(self, name: str, suggested: float | None) -> float:
        if name in self.weights:
            return float(self.weights[name])
        return float(suggested or 0.0)


# The score actions, in the order they are tested (most severe first).
SCORE_ACTIONS = (Action.REJECT, Action.DISCARD, Action.QUARANTINE, Action.TEMPFAIL,
                 Action.REWRITE_SUBJECT, Action.ADD_HEADER)


@dataclass
class Thresholds:
    """Score thresholds for the actions; a threshold of ``None`` disables that action."""

    levels: dict[Action, float]

    @classmethod
    def from_config(cls, table: dict) -> "Thresholds":
        levels: dict[Action, float] = {}
        for key, value in table.items():
            if key in ("domains", "recipients") or isinstance(value, dict):
                continue
            if value is False or value is None:
                continue
            levels[Action.parse(key)] = float(value)
        return cls(levels)

    def action_for(self, score: float) -> Action:
        """The single place where a total score becomes an action."""
        for action in SCORE_ACTIONS:
            level = self.levels.get(action)
            if level is not None and score >= level:
                return action
        return Action.ACCEPT


class ActionPolicy:
    """Resolves the thresholds that apply to one recipient: per recipient beats per domain beats
    the global ``[actions]`` table (each override only changes the keys it names)."""

    def __init__(self, actions_table: dict):
        self.table = actions_table or {}
        self.base = {k: v for k, v in self.table.items() if not isinstance(v, dict)}
        self.domains = {k.lower(): v for k, v in (self.table.get("domains") or {}).items()}
        self.recipients = {k.lower(): v for k, v in (self.table.get("recipients") or {}).items()}
        # recipient (lower case) -> its resolved Thresholds (the tables never change: a reload
        # builds a new ActionPolicy)
        self._resolved: dict[str | None, Thresholds] = {}

    def thresholds_for(self, recipient: str | None) -> Thresholds:
        key = recipient.lower() if recipient else None
        found = self._resolved.get(key)
        if found is None:
            if len(self._resolved) >= 10_000:  # a bound for a flood of distinct recipients
                self._resolved.clear()
            found = self._resolved[key] = self._resolve(recipient)
        return found

    def _resolve(self, recipient: str | None) -> Thresholds:
        merged = dict(self.base)
        if recipient:
            rcpt = recipient.lower()
            domain = rcpt.rpartition("@")[2]
            # the most specific domain override wins: a.b.example.com, then b.example.com, ...
            parts = domain.split(".")
            for i in range(len(parts) - 1, -1, -1):
                d = ".".join(parts[i:])
                if d in self.domains:
                    merged.update(self.domains[d])
            if rcpt in self.recipients:
                merged.update(self.recipients[rcpt])
        return Thresholds.from_config(merged)

    def action_for(self, score: float, recipient: str | None = None) -> Action:
        return self.thresholds_for(recipient).action_for(score)
