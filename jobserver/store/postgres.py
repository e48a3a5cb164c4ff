"""Everything PostgreSQL: the engine beneath the repository when the database is a
``postgresql://`` URL.

What differs from the shared repository, and only that (Oban's ``engines/lite.ex`` is
the shape, seen from the other side): connections and their settings, the threads that
run operations on them, transaction modes, retrying a transaction PostgreSQL rolled
back, the errors that mean "the database cannot be used", and migrating under a lock.

- **A small pool of connections, one per thread.**  psycopg's *sync* connections with
  autocommit off and ``prepare_threshold=None`` (no server-side prepared statements, so
  a PgBouncer in transaction mode in between is fine).  Every operation, a quick read
  included, runs whole in one trip to a pool thread, which takes an idle connection or
  opens one: nothing on the event loop waits on the network, and an operation's
  statements never cost a thread hop each.
- **Transactions.**  A write runs in READ COMMITTED (PostgreSQL's default): each
  compare-and-set re-reads the row it updates, and the queue head skips the rows other
  transactions hold (``SKIP LOCKED``).  A write that PostgreSQL rolls back (deadlock,
  serialization failure) is run again from the start, up to ``RETRIES`` times: the
  repository's operations are written to be run again.  A read runs in REPEATABLE READ,
  READ ONLY: one snapshot for all of an operation's statements, and never rolled back.
- **Group commit.**  Writes marked ``batched`` that arrive while a transaction commits
  go into the next one (``Batches``): one WAL flush for many.
- **Values.**  The repository binds times as ISO text and JSON as text.  ``str`` is
  sent as an untyped (``unknown``) literal, so PostgreSQL parses it as whatever the
  column or cast wants (``timestamptz``, ``json``), in SQLAlchemy's bind casts and in
  plain-text statements alike; psycopg's default since 3.0, pinned here on each
  connection.  Rows come back with ``datetime`` values (which the row decoder accepts)
  and JSON as its text, which the row decoder parses, as on SQLite.
- **A frozen node's transaction.**  With ``idle_timeout``, each connection asks
  PostgreSQL to end its transaction once it has been idle that long
  (``idle_in_transaction_session_timeout``): a node frozen mid-transaction (SIGSTOP) must
  not hold its row locks until it wakes.  A session setting, made once per connection: a
  PgBouncer in transaction mode does not keep it (docs/cluster.md says to set it on the
  database there).
- **Errors.**  Cannot connect, connection lost, server shutting down or read-only
  (a standby), disk full, statement timeout: ``StorageUnavailable``, and a broken
  connection is dropped from the pool.  Integrity errors and the operation's own
  errors pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.string import StrDumperUnknown, TextLoader
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.pool import NullPool

from jobserver.errors import StorageUnavailable
from jobserver.store.driver import Batches, Compiler, Operation, Tx
from jobserver.store.schema import upgrade_to_head

log = logging.getLogger("jobserver.store")
T = TypeVar("T")

POOL_SIZE = 4  # connections, and the threads that use them
BATCH_MAX = 200  # writes per shared transaction
RETRIES = 5  # times a write that PostgreSQL rolled back is run again
CONNECT_TIMEOUT = 10  # seconds, unless the URL says otherwise
# pg_advisory_xact_lock's key while migrating: nodes starting at once migrate once.
MIGRATION_LOCK = int.from_bytes(b"jobsrvmg", "big") & (2**63 - 1)

# The database cannot be used right now (as opposed to a bug or a constraint).  A write
# refused as read-only means a standby; a read runs read-only on purpose, so there the
# same error is a bug, passed through.
_UNAVAILABLE_TO_READ: tuple[type[Exception], ...] = (psycopg.OperationalError,)
_UNAVAILABLE_TO_WRITE = (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction)


def dialect() -> PGDialect_psycopg:
    """What statements are compiled with: ``%(name)s`` placeholders, as psycopg runs them."""
    return PGDialect_psycopg(paramstyle="pyformat")  # type: ignore[no-untyped-call]


def conninfo(url: str) -> str:
    """libpq's connection string for ``url`` (``postgresql://`` or SQLAlchemy's
    ``postgresql+psycopg://``), with a connect timeout unless it names one."""
    params = conninfo_to_dict(_libpq_url(url))
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    return make_conninfo("", **params)


def _libpq_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and scheme.split("+")[0] in ("postgresql", "postgres"):
        return f"postgresql://{rest}"
    return url  # a key=value connection string


def _sqlalchemy_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {url!r}")
    return f"postgresql+psycopg://{rest}"


def _unavailable(exc: Exception) -> StorageUnavailable:
    return StorageUnavailable(
        "the job database cannot be used right now (PostgreSQL unreachable, shutting "
        "down, read-only or out of space); retry later",
        str(exc),
    )


class PostgresDriver:
    """The driver for one PostgreSQL database (see the module docstring)."""

    def __init__(
        self, url: str, *, pool_size: int = POOL_SIZE, idle_timeout: float | None = None
    ) -> None:
        self.dialect = dialect()
        self._idle_timeout = idle_timeout
        self._conninfo = conninfo(url)
        self._compiler = Compiler(self.dialect)
        self._threads = ThreadPoolExecutor(pool_size, thread_name_prefix="jobserver-pg")
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self._opened: set[psycopg.Connection[Any]] = set()
        self._opened_lock = threading.Lock()
        self._batches: Batches[Operation[Any], Any] = Batches(self._commit_batch, BATCH_MAX)
        self.commits = self._batches.stats

    # -- the seam --------------------------------------------------------------------

    async def read(self, op: Operation[T], *, quick: bool = False) -> T:
        # ``quick`` changes nothing: even a primary-key lookup is a network round trip.
        (result,) = await self._on_thread(
            lambda: self._transaction([op], read=True), _UNAVAILABLE_TO_READ
        )
        read: T = result
        return read

    async def write(self, op: Operation[T], *, batched: bool = True) -> T:
        if batched:
            result: T = await self._batches.run(op)
            return result
        (result,) = await self._on_thread(
            lambda: self._transaction([op], read=False), _UNAVAILABLE_TO_WRITE
        )
        written: T = result
        return written

    async def close(self) -> None:
        await self._batches.drain()  # what is queued is committed and answered
        self._threads.shutdown(wait=True)
        with self._opened_lock:
            opened, self._opened = self._opened, set()
        for connection in opened:
            connection.close()

    # -- transactions, on a pool thread ------------------------------------------------

    async def _commit_batch(self, ops: list[Operation[Any]]) -> list[Any]:
        return await self._on_thread(
            lambda: self._transaction(ops, read=False), _UNAVAILABLE_TO_WRITE
        )

    async def _on_thread(
        self, function: Callable[[], T], unavailable: tuple[type[Exception], ...]
    ) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, function)
        except unavailable as exc:
            raise _unavailable(exc) from exc

    def _transaction(self, ops: list[Operation[Any]], *, read: bool) -> list[Any]:
        """The operations' results, committed together on one connection; nothing of
        them if one raises."""
        connection = self._take()
        try:
            # Applied by the BEGIN psycopg sends before the first statement.
            connection.read_only = read
            connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ if read else None
            tx = Tx(connection, self._compiler)
            tries = 0
            while True:
                tries += 1
                try:
                    results = [op(tx) for op in ops]
                    connection.commit()
                    return results
                except psycopg.errors.TransactionRollback as exc:
                    _rollback(connection)
                    if read or tries > RETRIES or connection.broken:
                        raise
                    log.debug("transaction rolled back by PostgreSQL (%s); again", exc)
                except BaseException:
                    _rollback(connection)
                    raise
        finally:
            self._give_back(connection)

    def _take(self) -> psycopg.Connection[Any]:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        connection = psycopg.connect(self._conninfo, autocommit=False, prepare_threshold=None)
        # str as an untyped literal: PostgreSQL casts ISO text to timestamptz and JSON
        # text to json (see the module docstring).
        connection.adapters.register_dumper(str, StrDumperUnknown)
        # json as its text: the row decoder parses it, as on SQLite (decoded here, a
        # result that is a JSON string would come back as a str and be parsed twice).
        connection.adapters.register_loader("json", TextLoader)
        if self._idle_timeout is not None:
            milliseconds = str(max(1, round(self._idle_timeout * 1000)))
            connection.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                [milliseconds],
            )
            connection.commit()
        with self._opened_lock:
            self._opened.add(connection)
        return connection

    def _give_back(self, connection: psycopg.Connection[Any]) -> None:
        if connection.broken or connection.closed:
            with self._opened_lock:
                self._opened.discard(connection)
            connection.close()
            return
        self._idle.put(connection)


def _rollback(connection: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):  # a broken connection is dropped after
        connection.rollback()


# -- the database: migrations -------------------------------------------------------------


def migrate(url: str) -> tuple[str | None, str | None]:
    """Apply every pending migration to the database at ``url``, in one transaction that
    holds a transaction-scoped advisory lock: nodes starting at once wait for each other
    and migrate once (a session lock would not survive a PgBouncer in transaction mode).
    Returns the schema revision before and after."""
    engine = sa.create_engine(
        _sqlalchemy_url(url), poolclass=NullPool, connect_args={"prepare_threshold": None}
    )
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            before, after = upgrade_to_head(conn)
    except sa.exc.OperationalError as exc:
        shown = sa.engine.make_url(_sqlalchemy_url(url)).render_as_string(hide_password=True)
        raise StorageUnavailable(
            f"cannot migrate the job database at {shown}: is PostgreSQL running and reachable?",
            str(exc.orig),
        ) from exc
    finally:
        engine.dispose()
    if before != after:
        log.info("migrated the database from schema %s to %s", before or "(empty)", after)
    return before, after
