"""filterd's own Bayesian spam classifier.

- :mod:`.tokenizer` — message → tokens (headers, decoded text, HTML hints, URLs, attachments);
- :mod:`.classifier` — Robinson's f(w) and Fisher's chi-square combining → spam probability;
- :mod:`.store` — the token database on a :class:`filterd.store.Store` (SQLite or Redis);
- :mod:`.engine` — :class:`Bayes` (classify, learn, forget) and :func:`learn_message`, the one
  learn path used by training by e-mail, autolearn, the CLI and quarantine release.
"""
from .classifier import Params, Result, classify
from .engine import Bayes, LearnStats, learn_message
from .tokenizer import tokenize

__all__ = ["Bayes", "LearnStats", "Params", "Result", "classify", "learn_message", "tokenize"]
