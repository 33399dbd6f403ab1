"""Spam headers: adds X-Spam-Flag/Status/Score/Report headers (names configurable) when a
recipient's outcome is add_header (or always, if configured), and rewrites the subject for
rewrite_subject. Incoming headers with the same names are removed first, so a sender cannot
forge a verdict."""
from __future__ import annotations

from filterd.hookspecs import hookimpl
from filterd.verdict import Action, Modification

CONFIG = """
# When to add the headers: "tagged" = when some recipient's action is add_header or
# rewrite_subject; "always" = on every message; "never".
add = "tagged"  # one of: tagged, always, never
flag_header = "X-Spam-Flag"
status_header = "X-Spam-Status"
score_header = "X-Spam-Score"
# The report lists every symbol with its score; "" switches it off.
report_header = "X-Spam-Report"
# Subject template for rewrite_subject; {subject} is the original subject.
subject_template = "[SPAM] {subject}"
# Remove incoming headers with the names above (they could be forged).
strip_incoming = true
"""

TAGGED = (Action.ADD_HEADER, Action.REWRITE_SUBJECT)


@hookimpl
def modify(ctx, message, options):
    mods: list[Modification] = []
    names = [options[k] for k in ("flag_header", "status_header", "score_header", "report_header")
             if options.get(k)]
    if options.get("strip_incoming", True):
        present = {n.lower() for n, _ in message.parsed.headers}
        mods += [Modification.remove_header(n) for n in names if n.lower() in present]
    actions = [r.verdict.action for r in ctx.recipients]
    tagged = any(a in TAGGED for a in actions)
    if options["add"] == "never" or (options["add"] == "tagged" and not tagged):
        return mods
    score = ctx.score_for(None)
    if ctx.recipients:  # report the highest recipient score (per-recipient rules included)
        score = max(ctx.score_for(r.address) for r in ctx.recipients)
    thresholds = ctx.pipeline.policy.thresholds_for(
        ctx.recipients[0].address if ctx.recipients else None)
    required = thresholds.levels.get(Action.ADD_HEADER, 0.0)
    syms = sorted(ctx.all_symbols(), key=lambda s: -abs(s.score))
    tests = ",".join(s.name for s in syms)
    if options.get("flag_header"):
        mods.append(Modification.add_header(options["flag_header"], "YES" if tagged else "NO"))
    if options.get("status_header"):
        mods.append(Modification.add_header(
            options["status_header"],
            f"{'Yes' if tagged else 'No'}, score={score:.1f} required={required:.1f} "
            f"tests={tests}"))
    if options.get("score_header"):
        mods.append(Modification.add_header(options["score_header"], f"{score:.1f}"))
    if options.get("report_header") and syms:
        mods.append(Modification.add_header(
            options["report_header"], " ".join(f"{s.name}({s.score:g})" for s in syms)))
    if Action.REWRITE_SUBJECT in actions:
        mods.append(Modification.rewrite_subject(options["subject_template"]))
    return mods
