"""jobserver: long-running Python functions as an HTTP job service on one box."""

# Imported by every job's process: keep this import-light (``reporting`` is stdlib only).
from jobserver.reporting import progress

__version__ = "0.1.0"
__all__ = ["__version__", "progress"]
