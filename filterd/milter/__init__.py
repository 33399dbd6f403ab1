"""Milter mode: filterd's pipeline behind Postfix or Sendmail.

Two engines speak the milter protocol (``[milter] engine``): ``native`` (default;
:mod:`.native` on :mod:`.protocol`, in the pipeline's event loop) and ``pymilter``
(:mod:`.libmilter`, Sendmail's libmilter). Both share :mod:`.server`'s callbacks and policy.

- :func:`run_milter` — blocking, builds its own pipeline(s); ``filterd milter``.
- :func:`run_milter_from_config` — ``await`` it inside a running program (``filterd serve``)
  with an existing pipeline.
- :mod:`filterd.milter.actions` — the pure mapping from a scan result to milter actions.
"""
from .server import (MilterSettings, check_listen, run_milter, run_milter_from_config,
                     swap_pipeline)

__all__ = ["MilterSettings", "check_listen", "run_milter", "run_milter_from_config",
           "swap_pipeline"]
