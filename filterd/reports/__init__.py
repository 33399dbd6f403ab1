"""Reports rendered with jinja2 (sandboxed, autoescaped): the quarantine digests for users and
the admin summary. Templates ship in ``filterd/reports/templates``; a site overrides any of them
by file name in ``[quarantine.digest] template_dir``."""
from .render import make_env

__all__ = ["make_env"]
