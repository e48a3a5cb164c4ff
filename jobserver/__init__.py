"""jobserver: long-running Python functions as an HTTP job service on one box."""

__version__ = "0.1.0"
