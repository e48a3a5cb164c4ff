"""Online backups (``jobserver backup``) and the copy taken before an upgrade migrates."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from jobserver.backup import BACKUP_DIR, backup
from jobserver.errors import ConfigError, StorageUnavailable
from jobserver.server import upgrade
from jobserver.store import migrate, migrations_dir, pending_migrations
from tests.conftest import ServerProcess, write_config


def count(database: Path, table: str) -> int:
    with sqlite3.connect(database) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_backup_while_another_connection_writes(tmp_path: Path) -> None:
    database = tmp_path / "jobserver.db"
    migrate(database)
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE ticks (n INTEGER NOT NULL)")
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        conn = sqlite3.connect(database, timeout=10)
        while not stop.is_set():
            with conn:
                conn.execute("INSERT INTO ticks VALUES (?)", (written[0],))
            written[0] += 1
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while written[0] < 200:  # the writer is well under way
            pass
        copies = [backup(database, tmp_path / f"copy-{i}.db") for i in range(5)]
    finally:
        stop.set()
        thread.join()
    seen = []
    for copy in copies:
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            rows = [n for (n,) in conn.execute("SELECT n FROM ticks ORDER BY n")]
        assert rows == list(range(len(rows)))  # a consistent prefix: no gaps, no torn page
        seen.append(len(rows))
    assert 200 <= seen[0] <= seen[-1] <= written[0]
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary names are gone


def test_backup_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    database = tmp_path / "jobserver.db"
    migrate(database)
    target = tmp_path / "copy.db"
    target.write_text("precious")
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        backup(database, target)
    assert target.read_text() == "precious"
    backup(database, target, overwrite=True)
    assert count(target, "jobs") == 0


def test_backup_into_a_directory_names_the_copy(tmp_path: Path) -> None:
    database = tmp_path / "jobserver.db"
    migrate(database)
    (tmp_path / "backups").mkdir()
    written = backup(database, tmp_path / "backups")
    assert written.parent == tmp_path / "backups"
    assert written.name.startswith("jobserver-") and written.suffix == ".db"
    assert count(written, "jobs") == 0


def test_backup_of_a_missing_database_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no database at"):
        backup(tmp_path / "missing.db", tmp_path / "copy.db")
    assert not (tmp_path / "missing.db").exists()  # read-only: never creates the source
    assert not (tmp_path / "copy.db").exists()


def test_backup_command_while_the_server_runs(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    config_path = write_config(tmp_path)
    server = server_factory(config_path)
    job = httpx.post(
        f"{server.url}/api/v1/jobs", json={"task": "add", "args": {"a": 1, "b": 2}}
    ).json()
    target = tmp_path / "out" / "copy.db"
    done = subprocess.run(
        [sys.executable, "-m", "jobserver", "backup", str(target), "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"to {target}" in done.stdout
    with sqlite3.connect(target) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM jobs")]
    assert job["id"] in ids
    again = subprocess.run(
        [sys.executable, "-m", "jobserver", "backup", str(target), "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2
    assert "already exists; pass --force" in again.stderr
    assert server.stop() == 0


def _downgrade_to_base(database: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(migrations_dir()))
            config.attributes["connection"] = conn
            command.downgrade(config, "base")
    finally:
        engine.dispose()


def test_upgrade_backs_up_an_existing_database_first(tmp_path: Path) -> None:
    database = tmp_path / "jobserver.db"
    migrate(database)
    _downgrade_to_base(database)  # an old file: every migration is pending again
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE keep (note TEXT)")
        conn.execute("INSERT INTO keep VALUES ('before the upgrade')")
    assert pending_migrations(database)

    copy = upgrade(database)

    assert copy is not None and copy.parent == tmp_path / BACKUP_DIR
    assert "before-" in copy.name
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT note FROM keep").fetchall() == [("before the upgrade",)]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "jobs" not in tables  # the copy is the file as it was before migrating
    assert pending_migrations(database) == []
    assert count(database, "jobs") == 0


def test_upgrade_takes_no_backup_when_nothing_is_pending_or_the_file_is_new(
    tmp_path: Path,
) -> None:
    database = tmp_path / "jobserver.db"
    assert upgrade(database) is None  # a new file: nothing to lose
    assert upgrade(database) is None  # up to date
    assert not (tmp_path / BACKUP_DIR).exists()


def test_an_unwritable_target_is_a_clear_error(tmp_path: Path) -> None:
    database = tmp_path / "jobserver.db"
    migrate(database)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StorageUnavailable, match="cannot back up"):
        backup(database, blocker / "sub" / "copy.db")  # a directory under a plain file


def test_serve_backs_up_before_migrating(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    config_path = write_config(tmp_path)
    database = tmp_path / "data" / "jobserver.db"
    migrate(database)
    _downgrade_to_base(database)
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE keep (note TEXT)")

    server = server_factory(config_path)

    copies = list((database.parent / BACKUP_DIR).glob("jobserver-*-before-*.db"))
    assert len(copies) == 1
    assert str(copies[0]) in server.log()
    assert httpx.get(f"{server.url}/api/v1/jobs").json()["jobs"] == []  # migrated
    assert server.stop() == 0
    server_factory(config_path).stop()  # up to date now: no second copy
    assert len(list((database.parent / BACKUP_DIR).iterdir())) == 1
