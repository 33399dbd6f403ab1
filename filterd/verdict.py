"""Verdicts: the one type for every outcome, and the modifications a message may receive.

Plugins and the policy speak in :class:`Verdict`; only the front doors (SMTP listener, proxy,
milter) turn a verdict into a protocol reply. Outcomes are *per recipient*: the pipeline keeps one
:class:`Verdict` for each recipient of a transaction.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Action(enum.Enum):
    """What happens to a message (or to one of its recipients).

    The order of :attr:`severity` is how outcomes combine: when two sources disagree about one
    recipient, the more severe wins, and the "overall" action of a message is the most severe over
    its recipients. ``CONTINUE`` means "no decision yet" and never reaches a front door.
    """

    CONTINUE = "continue"
    ACCEPT = "accept"
    ADD_HEADER = "add_header"
    REWRITE_SUBJECT = "rewrite_subject"
    QUARANTINE = "quarantine"
    DISCARD = "discard"
    TEMPFAIL = "tempfail"
    REJECT = "reject"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]

    @property
    def delivers(self) -> bool:
        """True when the recipient still gets the message in its inbox (perhaps tagged)."""
        return self in (Action.CONTINUE, Action.ACCEPT, Action.ADD_HEADER, Action.REWRITE_SUBJECT)

    @property
    def refuses(self) -> bool:
        """True for the actions a front door answers with an SMTP error (5xx or 4xx)."""
        return self in (Action.REJECT, Action.TEMPFAIL)

    @classmethod
    def parse(cls, text: str) -> "Action":
        t = text.strip().lower().replace(" ", "_").replace("-", "_")
        if t in ("no_action", "none", "pass"):
            return cls.ACCEPT
        if t in ("soft_reject", "defer", "greylist"):
            return cls.TEMPFAIL
        return cls(t)


_SEVERITY = {a: i for i, a in enumerate(Action)}

# Default SMTP replies per action; a verdict may carry its own code/enhanced code/text.
DEFAULT_REPLY = {
    Action.ACCEPT: (250, "2.0.0", "OK"),
    Action.ADD_HEADER: (250, "2.0.0", "OK"),
    Action.REWRITE_SUBJECT: (250, "2.0.0", "OK"),
    Action.QUARANTINE: (250, "2.0.0", "OK"),
    Action.DISCARD: (250, "2.0.0", "OK"),
    Action.TEMPFAIL: (451, "4.7.1", "Try again later"),
    Action.REJECT: (550, "5.7.1", "Message rejected"),
}


@dataclass(frozen=True)
class Modification:
    """One change to the message. ``kind`` is one of:

    - ``add_header``: add ``name: value`` (at the top, where tracking headers belong)
    - ``remove_header``: remove every ``name`` header (``value`` empty) or those equal to ``value``
    - ``change_header``: replace the first ``name`` header's value with ``value``
    - ``rewrite_subject``: ``value`` is a template; ``{subject}`` stands for the old subject
    - ``replace_body``: ``body`` holds the new body bytes (headers kept), e.g. after stripping a
      part
    """

    kind: str
    name: str = ""
    value: str = ""
    body: bytes | None = None

    KINDS = ("add_header", "remove_header", "change_header", "rewrite_subject", "replace_body")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown modification kind {self.kind!r}; "
                             f"expected one of {self.KINDS}")

    @classmethod
    def add_header(cls, name: str, value: str) -> "Modification":
        return cls("add_header", name, value)

    @classmethod
    def remove_header(cls, name: str, value: str = "") -> "Modification":
        return cls("remove_header", name, value)

    @classmethod
    def change_header(cls, name: str, value: str) -> "Modification":
        return cls("change_header", name, value)

    @classmethod
    def rewrite_subject(cls, template: str) -> "Modification":
        return cls("rewrite_subject", "Subject", template)

    @classmethod
    def replace_body(cls, body: bytes) -> "Modification":
        return cls("replace_body", body=body)


@dataclass
class Verdict:
    """An outcome: an :class:`Action` with an optional SMTP code, enhanced status code and reason.

    Build them with the class methods: ``Verdict.reject("no such user", code=550,
    enhanced="5.1.1")``. ``source`` names who decided (plugin or rule) for logs and traces.
    """

    action: Action
    reason: str = ""
    code: int | None = None
    enhanced: str | None = None
    source: str = ""
    modifications: list[Modification] = field(default_factory=list)

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def cont(cls) -> "Verdict":
        return cls(Action.CONTINUE)

    @classmethod
    def accept(cls, reason: str = "", **kw) -> "Verdict":
        return cls(Action.ACCEPT, reason, **kw)

    @classmethod
    def reject(cls, reason: str = "", code: int = 550, enhanced: str = "5.7.1", **kw) -> "Verdict":
        return cls(Action.REJECT, reason, code, enhanced, **kw)

    @classmethod
    def tempfail(cls, reason: str = "", code: int = 451, enhanced: str = "4.7.1",
                 **kw) -> "Verdict":
        return cls(Action.TEMPFAIL, reason, code, enhanced, **kw)

    @classmethod
    def discard(cls, reason: str = "", **kw) -> "Verdict":
        return cls(Action.DISCARD, reason, **kw)

    @classmethod
    def quarantine(cls, reason: str = "", **kw) -> "Verdict":
        return cls(Action.QUARANTINE, reason, **kw)

    # -- protocol view (used by front doors only) ----------------------------------------------
    def smtp_reply(self) -> tuple[int, str, str]:
        """(code, enhanced status, text) for this verdict, filling defaults per action."""
        dcode, denh, dtext = DEFAULT_REPLY.get(self.action, (250, "2.0.0", "OK"))
        code = self.code or dcode
        enh = self.enhanced or denh
        # keep the enhanced code's class consistent with the basic code (RFC 3463)
        if str(code)[0] != enh[0]:
            enh = str(code)[0] + enh[1:]
        text = self.reason or dtext
        return code, enh, text.replace("\r", " ").replace("\n", " ")

    def is_final(self) -> bool:
        return self.action is not Action.CONTINUE

    def worse(self, other: "Verdict | None") -> "Verdict":
        """The more severe of two verdicts (self wins ties)."""
        if other is None or self.action.severity >= other.action.severity:
            return self
        return other

    def to_dict(self) -> dict:
        d = {"action": self.action.value}
        if self.reason:
            d["reason"] = self.reason
        if self.code:
            d["code"] = self.code
        if self.enhanced:
            d["enhanced"] = self.enhanced
        if self.source:
            d["source"] = self.source
        return d
