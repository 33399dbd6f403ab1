"""filterd's own small web server: the quarantine confirmation, result and list pages."""
from .server import QuarantineWeb

__all__ = ["QuarantineWeb"]
