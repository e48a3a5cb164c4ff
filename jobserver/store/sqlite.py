"""Everything SQLite: the engine beneath the repository when ``database`` is a path.

What differs from the shared repository, and only that (Oban's ``engines/lite.ex`` is
the shape): connections and their pragmas; one writer thread whose transactions begin
``IMMEDIATE``; group commit; quick reads on the event loop; ``INDEXED BY`` hints; the WAL
checkpoint; the online backup copy; the one-server-per-file lock; migrating the file.

- **One writer thread.**  Every write transaction runs whole, in one trip, on a thread
  that owns the one writing ``sqlite3`` connection.  ``BEGIN IMMEDIATE`` takes the write
  lock up front, so a transaction that reads then writes waits on ``busy_timeout``
  instead of failing with ``SQLITE_BUSY_SNAPSHOT`` (FIELD-NOTES).  Each trip to a thread
  wakes it and hands the GIL over and back (0.1-0.4 ms under load), so an operation's
  statements never cost a trip each.
- **Group commit.**  Writes that arrive while a transaction commits go into the next one
  (``Batches``): one fsync for many submits, claims and outcomes.
- **Quick reads on the event loop.**  A primary-key lookup costs tens of microseconds,
  less than one thread hop.  In WAL mode a reader never waits for the writer; the quick
  connection has ``busy_timeout`` 0, so in the rare case SQLite answers BUSY the read is
  run again on a reader thread, which waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite.base import SQLiteCompiler
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

from jobserver.errors import ServerLocked, StorageUnavailable
from jobserver.store.driver import (
    ROWS_PER_INSERT,
    Batches,
    Compiler,
    Operation,
    Tx,
    rows_by_keys,
)
from jobserver.store.schema import pending_revisions, upgrade_to_head

log = logging.getLogger("jobserver.store")
T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
JOURNAL_SIZE_LIMIT = 64 * 2**20
BATCH_MAX = 200  # writes per shared transaction: bounds how long one holds the lock
READER_THREADS = 2


class _HintingCompiler(SQLiteCompiler):
    """Renders a statement's SQLite table hints (``INDEXED BY``): without statistics
    SQLite prefers the plain (state, ...) indexes over the queue's partial ones."""

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text


class _Dialect(SQLiteDialect_pysqlite):
    statement_compiler = _HintingCompiler


def dialect() -> _Dialect:
    return _Dialect(paramstyle="qmark")


def _connect(database: Path, *, synchronous: str, timeout_ms: int, query_only: bool) -> Any:
    """A connection whose transactions we begin ourselves (``isolation_level=None``), with
    the per-connection pragmas (they do not persist in the file)."""
    connection = sqlite3.connect(
        database, isolation_level=None, check_same_thread=False, timeout=timeout_ms / 1000
    )
    for pragma in (
        f"PRAGMA busy_timeout = {timeout_ms}",
        f"PRAGMA synchronous = {synchronous}",
        "PRAGMA foreign_keys = ON",
        f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}",
        # A write inside BEGIN ... COMMIT keeps a statement journal, so that a failing
        # statement alone rolls back; on disk that is a temp file created, written and
        # unlinked per transaction (half the writer's syscalls in a submit burst).  The
        # writer's statements are small: keep it in memory.  Readers keep big sorts on disk.
        *(["PRAGMA query_only = ON"] if query_only else ["PRAGMA temp_store = MEMORY"]),
    ):
        connection.execute(pragma)
    return connection


def _unavailable(exc: sqlite3.OperationalError) -> StorageUnavailable:
    return StorageUnavailable(
        "the job database cannot be used right now (disk full, read-only or locked); "
        "nothing was changed; retry later",
        str(exc),
    )


class SqliteDriver:
    """The driver for one SQLite file (see the module docstring)."""

    def __init__(
        self, database: Path, *, synchronous: str = "FULL", busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.database = database
        self.dialect = dialect()
        self._compiler = Compiler(self.dialect)
        self._synchronous = synchronous
        self._timeout_ms = busy_timeout_ms
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobserver-writer")
        self._writer_connection: Any = None
        self._readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="jobserver-reader")
        self._reader_connections: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._opened: list[Any] = []
        self._opened_lock = threading.Lock()
        self._quick: Any = None
        self._quick_tx: Tx | None = None
        self._trace: Callable[[str], None] | None = None
        self._batches: Batches[Operation[Any], Any] = Batches(self._commit_batch, BATCH_MAX)
        self.commits = self._batches.stats

    # -- the seam --------------------------------------------------------------------

    async def read(self, op: Operation[T], *, quick: bool = False) -> T:
        if quick:
            try:
                # One statement, its own snapshot: no BEGIN and COMMIT around it.
                return op(self._quick_tx or self._open_quick())
            except sqlite3.OperationalError:
                pass  # busy (or the quick connection broke): a reader thread waits
        return await self._on_reader_thread(op)

    async def write(self, op: Operation[T], *, batched: bool = True) -> T:
        if batched:
            result: T = await self._batches.run(op)
            return result
        (result,) = await self._on_writer_thread(lambda: self._transaction([op]))
        return result

    async def insert(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        alike = rows_by_keys(rows)
        if len(alike) > 1 or len(rows) > ROWS_PER_INSERT:
            await self.write(lambda tx: tx.insert(table, rows), batched=False)
            return

        def one_statement() -> None:
            # Its own transaction (the connection autocommits): all rows or none.
            Tx(self._writer_connection or self._open_writer(), self._compiler).insert(table, rows)

        await self._on_writer_thread(one_statement)

    async def close(self) -> None:
        await self._batches.drain()  # what is queued is committed and answered
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._opened_lock:
            for connection in self._opened:
                connection.close()
            self._opened.clear()
        if self._quick is not None:
            self._quick.close()
            self._quick = self._quick_tx = None

    # -- writes ------------------------------------------------------------------------

    async def _commit_batch(self, ops: list[Operation[Any]]) -> list[Any]:
        return await self._on_writer_thread(lambda: self._transaction(ops))

    def _transaction(self, ops: list[Operation[Any]]) -> list[Any]:
        """In the writer's thread: the operations' results, committed together; nothing
        of them if one raises."""
        connection = self._writer_connection or self._open_writer()
        tx = Tx(connection, self._compiler)
        connection.execute("BEGIN IMMEDIATE")
        try:
            results = [op(tx) for op in ops]
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        return results

    async def _on_writer_thread(self, function: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, function)
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    # -- reads -------------------------------------------------------------------------

    def _read_on(self, connection: Any, op: Operation[T]) -> T:
        connection.execute("BEGIN")  # one snapshot for all of the operation's statements
        try:
            return op(Tx(connection, self._compiler))
        finally:
            connection.execute("COMMIT")

    def _open_quick(self) -> Tx:
        # busy_timeout 0: never wait on the event loop.
        self._quick = _connect(
            self.database, synchronous=self._synchronous, timeout_ms=0, query_only=True
        )
        self._quick.set_trace_callback(self._trace)
        self._quick_tx = Tx(self._quick, self._compiler)  # kept: a Tx holds no state
        return self._quick_tx

    def trace(self, callback: Callable[[str], None] | None) -> None:
        """Pass every statement any of this driver's connections runs to ``callback``
        (``sqlite3``'s trace: the SQL with its values), or stop with None."""
        self._trace = callback
        with self._opened_lock:
            connections = [*self._opened, *([self._quick] if self._quick else [])]
        for connection in connections:
            connection.set_trace_callback(callback)

    async def _on_reader_thread(self, op: Operation[T]) -> T:
        def read() -> T:
            try:
                connection = self._reader_connections.get_nowait()
            except queue.Empty:
                connection = self._open(query_only=True)
            try:
                return self._read_on(connection, op)
            finally:
                self._reader_connections.put(connection)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, read)
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    def _open_writer(self) -> Any:
        self._writer_connection = self._open(query_only=False)
        return self._writer_connection

    def _open(self, *, query_only: bool) -> Any:
        connection = _connect(
            self.database,
            synchronous=self._synchronous,
            timeout_ms=self._timeout_ms,
            query_only=query_only,
        )
        connection.set_trace_callback(self._trace)
        with self._opened_lock:
            self._opened.append(connection)
        return connection

    # -- the file under an admin's hands -----------------------------------------------

    def wal_size(self) -> int:
        """Bytes in the write-ahead log (0 when there is none)."""
        try:
            return os.stat(self.database.with_name(self.database.name + "-wal")).st_size
        except FileNotFoundError:
            return 0

    async def checkpoint(self) -> Checkpoint:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` on a connection of its own that never waits:
        while a reader holds an old snapshot, it copies what it can and reports ``busy``
        instead of stalling the writer behind the reader (busy_timeout = 0)."""
        return await asyncio.to_thread(_checkpoint, self.database)

    async def synchronous(self) -> int:
        """The writer's ``PRAGMA synchronous``: 2 (FULL) or 1 (NORMAL)."""

        def read() -> int:
            connection = self._writer_connection or self._open_writer()
            return int(connection.execute("PRAGMA synchronous").fetchone()[0])

        return await self._on_writer_thread(read)

    async def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check``: ``["ok"]`` for a sound file."""
        rows = await self.read(lambda tx: tx.rows(sa.text("PRAGMA integrity_check")))
        return [str(row[0]) for row in rows]


@dataclass(frozen=True)
class Checkpoint:
    busy: bool  # a reader kept part of the log from being copied back
    wal_pages: int
    checkpointed_pages: int
    wal_size_after: int


def _checkpoint(database: Path) -> Checkpoint:
    db = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        busy, pages, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as exc:
        raise StorageUnavailable(f"checkpoint failed: {exc}", str(exc)) from exc
    finally:
        db.close()
    try:
        after = os.stat(database.with_name(database.name + "-wal")).st_size
    except FileNotFoundError:
        after = 0
    return Checkpoint(bool(busy), int(pages), int(done), after)


# -- the file: migrations, backups, the lock ----------------------------------------------


def migrate(database: Path) -> tuple[str | None, str | None]:
    """Create the file if needed, switch it to WAL, and apply every pending migration;
    returns the schema revision before and after."""
    database.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            # WAL persists in the file: readers (an admin's sqlite3 shell) never block writers.
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            before, after = upgrade_to_head(conn)
    finally:
        engine.dispose()
    if before != after:
        log.info("migrated %s from schema %s to %s", database, before or "(empty)", after)
    return before, after


def pending_migrations(database: Path) -> list[str]:
    """The revisions ``migrate`` would apply to an existing file, oldest first; empty for
    a file that does not exist (nothing to lose) or is up to date."""
    if not database.is_file():
        return []
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            return pending_revisions(conn)
    finally:
        engine.dispose()


def copy_database(database: Path, target: Path) -> str:
    """SQLite's online backup of ``database`` into the new file ``target``, as one
    consistent moment even while a server commits; returns ``PRAGMA quick_check``."""
    try:
        source = sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)
        try:
            copy = sqlite3.connect(target)
            try:
                # One step (pages=-1): the whole copy is read in one read transaction.
                source.backup(copy, pages=-1)
                # A self-contained file: no -wal/-shm needed to open the copy elsewhere.
                copy.execute("PRAGMA journal_mode = DELETE")
                return str(copy.execute("PRAGMA quick_check").fetchone()[0])
            finally:
                copy.close()
        finally:
            source.close()
    except sqlite3.Error as exc:
        raise StorageUnavailable(
            f"cannot back up {database} to {target}: {exc}",
            {"database": str(database), "target": str(target)},
        ) from None


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``, held while a server runs.

    Only one server may serve a file: a second one would requeue the first one's running
    jobs as if their server had died.  The lock dies with the process, even on SIGKILL.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ServerLocked(
                f"another jobserver (pid {holder}) is already serving {self.path.with_suffix('')}; "
                "stop it first or point this one at another database",
                {"pid": holder, "lock": str(self.path)},
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
