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
- **Notifications.**  ``Listener`` LISTENs on a dedicated connection of its own (never
  one of the pool's) and hands each payload on; ``Store.notify`` sends one.  They only
  wake: whoever is woken re-reads the database.
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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import psycopg.sql
import sqlalchemy as sa
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.string import StrDumperUnknown, TextLoader
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.pool import NullPool

from jobserver.errors import StorageUnavailable
from jobserver.store.driver import Batches, Compiler, Operation, Tx
from jobserver.store.schema import NOTIFY_CHANNEL, upgrade_to_head

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


# Kept alive by the kernel: a LISTEN connection that the network dropped silently ends
# within a minute or so (then the listener reconnects), instead of waiting forever.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5}
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 30.0  # seconds between tries to LISTEN again


class Listener:
    """LISTEN on ``channel`` (the nodes' own) on a connection of its own:
    ``received(payload)`` for each notification, ``connected()`` after every
    (re)connection (what was sent while it was down is lost: the caller wakes everything
    then).  A connection that fails is opened again, waiting longer each time (up to
    ``RECONNECT_MAX``); meanwhile the callers' polling does the work.  ``start``/``stop``
    are safe to call twice."""

    def __init__(
        self,
        url: str,
        received: Callable[[str], None],
        connected: Callable[[], None],
        channel: str = NOTIFY_CHANNEL,
    ) -> None:
        params = conninfo_to_dict(conninfo(url))
        for key, value in _KEEPALIVES.items():
            params.setdefault(key, value)
        self._conninfo = make_conninfo("", **params)
        self._channel = channel
        self._received = received
        self._connected = connected
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while a LISTEN is in place (tests wait on it)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="jobserver-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = RECONNECT_FIRST
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, prepare_threshold=None
                ) as connection:
                    await connection.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self._channel))
                    )
                    self.listening.set()
                    delay = RECONNECT_FIRST
                    self._connected()
                    async for notice in connection.notifies():
                        self._received(notice.payload)
            except psycopg.Error as exc:
                log.warning(
                    "cannot LISTEN for other nodes' notifications (%s); polling meanwhile, "
                    "trying again in %.1f s",
                    str(exc).strip() or type(exc).__name__,
                    delay,
                )
            finally:
                self.listening.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)


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

    async def insert(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        await self.write(lambda tx: tx.insert(table, rows), batched=False)

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


# -- an application's own transaction (``jobserver.store.enqueue``) -------------------------

# What ``caller_transaction`` accepts: the application's psycopg 3 connection, or its
# SQLAlchemy Connection over psycopg.
CallerConnection = psycopg.Connection[Any] | sa.Connection
_CALLER_COMPILER = Compiler(dialect())


def caller_transaction(connection: CallerConnection) -> Tx:
    """The transaction the caller has open on ``connection``, for the repository's
    operations: statements run in it, and commit or roll back with it."""
    if isinstance(connection, sa.Connection):
        # The DB-API connection under SQLAlchemy's transaction (public API).
        connection = connection.connection.driver_connection  # type: ignore[assignment]
    if not isinstance(connection, psycopg.Connection):
        raise TypeError(
            "needs a psycopg 3 connection or a SQLAlchemy Connection over psycopg, "
            f"not {type(connection).__name__}"
        )
    return Tx(_Untyped(connection), _CALLER_COMPILER)


class _Untyped:
    """The caller's connection, each statement on a cursor of its own that sends ``str`` as
    an untyped literal (as the driver's connections do; the caller's own adapters are
    left as they are)."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def cursor(self) -> psycopg.Cursor[Any]:
        cursor = self._connection.cursor()
        cursor.adapters.register_dumper(str, StrDumperUnknown)
        return cursor

    def execute(self, sql: str, params: Any) -> psycopg.Cursor[Any]:
        return self.cursor().execute(sql, params)
