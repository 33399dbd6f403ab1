"""filterd — a mail gateway with one plugin pipeline behind three front doors."""

__version__ = "0.1.0"
