"""Rules: evaluates the TOML rules (rules/*.toml plus the site rules directory) on every message
and reports each matching rule as a symbol with its score."""
from __future__ import annotations

from filterd.hookspecs import hookimpl
from filterd.rules import load_rules

CONFIG = """
# The rules engine itself is configured in [rules] (shipped = true, site_dir = "...").
"""


class Plugin:
    def __init__(self, options, services):
        self.services = services
        self.ruleset = None

    @hookimpl
    def startup(self, services):
        # strict: a bad regex or unknown key in a rule file stops start-up with the culprit named
        self.ruleset, _ = load_rules(services.config)

    @hookimpl
    def data(self, ctx, message):
        hits, rcpt_hits = self.ruleset.evaluate(ctx)
        for rule in self.ruleset.rules:
            if not hits.get(rule.name) or rule.silent:
                continue
            if rule.per_recipient:
                for addr in rcpt_hits.get(rule.name, ()):
                    ctx.add_symbol(rule.name, rule.score, description=rule.description,
                                   recipient=addr, source="rules")
            else:
                ctx.add_symbol(rule.name, rule.score, description=rule.description, source="rules")
