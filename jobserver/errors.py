"""The exceptions jobserver raises on purpose.

    JobServerError            base: code (a stable machine-readable string), message, details
    ├── ConfigError           config.toml is missing, unreadable or has a bad key/value
    ├── ValidationError       a request's content is wrong (bad args, bad field)
    │   └── UnknownTask       the named task is not registered
    ├── NotFound              no such job (or route)
    │   └── Gone              the job existed and was pruned (retention)
    ├── InvalidTransition     the job's state does not allow the change (cancel a finished job)
    ├── Conflict              the request clashes with stored state (Idempotency-Key reuse)
    ├── ServerLocked          another server already serves this database file
    └── StorageUnavailable    the database cannot be read or written (disk full, read-only)

HTTP status codes are the API's business; it maps these classes to them.
"""

from __future__ import annotations

from typing import Any


class JobServerError(Exception):
    code = "error"

    def __init__(self, message: str, details: Any = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(JobServerError):
    code = "config_error"


class ValidationError(JobServerError):
    code = "validation_error"


class UnknownTask(ValidationError):
    code = "unknown_task"


class NotFound(JobServerError):
    code = "not_found"


class Gone(NotFound):
    """A job that retention deleted: no longer there, and not a typo either."""

    code = "gone"


class InvalidTransition(JobServerError):
    code = "invalid_state"


class ServerLocked(JobServerError):
    code = "server_locked"


class StorageUnavailable(JobServerError):
    code = "storage_unavailable"


class Conflict(JobServerError):
    """The request clashes with stored state other than a job's state (an Idempotency-Key
    reused with a different body)."""

    code = "conflict"
