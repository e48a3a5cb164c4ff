"""Online copies of the database file: ``jobserver backup`` and the copy taken before an
upgrade migrates the database.

The copy uses SQLite's online backup API through a read-only connection, so it is safe
while a server writes (in WAL mode readers never block the writer); it is a consistent
snapshot of one moment.  It is written to a temporary name next to the target, checked
(``PRAGMA quick_check``), synced, then renamed into place: the target is either the old
file or the complete new copy, never half a file.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path

from jobserver.errors import ConfigError, StorageUnavailable
from jobserver.store.sqlite import copy_database

BACKUP_DIR = "backups"  # next to the database, for the copies taken before upgrades


def backup(database: Path, target: Path, *, overwrite: bool = False) -> Path:
    """Copy ``database`` to ``target`` (a file, or an existing directory to put a
    timestamped copy in); return the file written."""
    if not database.is_file():
        raise ConfigError(
            f"no database at {database}; check server.database in the config",
            {"database": str(database)},
        )
    if target.is_dir():
        target = target / default_name(database)
    if target.exists() and not overwrite:
        raise ConfigError(
            f"{target} already exists; pass --force to replace it", {"target": str(target)}
        )
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        check = copy_database(database, temporary)
        if check != "ok":
            raise StorageUnavailable(
                f"the copy of {database} failed its integrity check: {check}",
                {"database": str(database), "check": check},
            )
        _fsync(temporary)
        os.replace(temporary, target)
        _fsync(target.parent)
    except OSError as exc:
        raise StorageUnavailable(
            f"cannot back up {database} to {target}: {exc}",
            {"database": str(database), "target": str(target)},
        ) from None
    finally:
        with contextlib.suppress(OSError):  # gone already (renamed), or never made
            temporary.unlink()
    return target


def default_name(database: Path, reason: str = "") -> str:
    """``jobserver-20250101T120000Z.db`` (``-before-REV`` when ``reason`` says why)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    suffix = f"-{reason}" if reason else ""
    return f"{database.stem}-{stamp}{suffix}{database.suffix or '.db'}"


def backup_before_upgrade(database: Path, pending: list[str]) -> Path | None:
    """Copy an existing database into ``<its dir>/backups/`` before ``pending`` migrations
    change it; nothing for a new file or an up-to-date one."""
    if not pending or not database.is_file() or database.stat().st_size == 0:
        return None
    name = default_name(database, f"before-{pending[-1]}")
    return backup(database, database.parent / BACKUP_DIR / name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
