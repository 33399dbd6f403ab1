"""Shipped rule files (``*.toml``), installed as the data package ``filterd_rules``."""
