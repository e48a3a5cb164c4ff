"""The seam between the repository and a database engine: a driver is five methods wide.

The repository writes each job operation once, as a plain function of a transaction
(an ``Operation``): statements built with SQLAlchemy Core, run through ``Tx``.  A driver
decides only *where and how* an operation runs: which connection, which thread, which
transaction mode, whether several writes share one commit.  It knows no job.

- ``read(op, quick=...)``: ``op`` in a read transaction (one consistent snapshot).
  ``quick`` says the operation is one statement of index lookups, so a driver may run it
  on the event loop itself, outside a transaction (one statement is its own snapshot).
- ``write(op, batched=...)``: ``op`` in a write transaction; when ``batched``, the driver
  may commit it together with other writes (every caller is answered after the commit
  that holds its write).  An operation that raises rolls back its own work only.
- ``insert(table, rows)``: the rows, all or none, in a transaction of their own (the
  repository's batch of plain submits: already one commit's worth).  On SQLite, rows
  that share their keys are one statement, run without BEGIN and COMMIT: inside them,
  SQLite keeps a statement journal for a multi-row INSERT, a fifth of its cost.
- ``close()``: commit what is queued, then release everything.
- ``dialect``: what ``Tx`` compiles statements with.

Errors: a driver raises ``StorageUnavailable`` when the database cannot be used at all
(locked past its timeout, disk full, read-only, unreachable); the domain errors an
operation raises (``NotFound``, ``Conflict``...) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

from jobserver.errors import StorageUnavailable

log = logging.getLogger("jobserver.store")
T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")
Row = tuple[Any, ...]
COMPILED_KEPT = 256  # statements a driver keeps compiled (those built once, and recent ones)
ROWS_PER_INSERT = 256  # rows per multi-row INSERT: 3,072 parameters for a job's 12 columns


class Tx:
    """One transaction a driver has begun, on a DB-API connection.

    Statements are compiled for the driver's dialect once and kept (building and
    compiling a statement costs more than SQLite takes to run it); the values they carry
    as literals are merged with the caller's ``parameters``."""

    __slots__ = ("_compiled", "_connection")

    def __init__(self, connection: Any, compiled: Compiler) -> None:
        self._connection = connection
        self._compiled = compiled

    def rows(self, statement: sa.ClauseElement, parameters: Mapping[str, Any] = {}) -> list[Row]:
        """The rows the statement returns, as tuples."""
        cursor = self._cursor(statement, parameters)
        try:
            rows: list[Row] = cursor.fetchall()  # DB-API drivers give tuples by default
            return rows
        finally:
            cursor.close()

    def run(self, statement: sa.ClauseElement, parameters: Mapping[str, Any] = {}) -> int:
        """How many rows the statement changed."""
        cursor = self._cursor(statement, parameters)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def insert(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert the rows, in one statement per set of keys where the dialect's
        parameters are ``?`` (SQLite: it opens the table's and its indexes' cursors once
        for all the rows, half the cost of a statement each), else one prepared statement
        bound per row (psycopg pipelines them)."""
        for names, alike in rows_by_keys(rows).items():
            if self._compiled.dialect.paramstyle == "qmark":
                for start in range(0, len(alike), ROWS_PER_INSERT):
                    chunk = alike[start : start + ROWS_PER_INSERT]
                    values = [row[name] for row in chunk for name in names]
                    self._connection.execute(_qmark_insert(table, names, len(chunk)), values)
                continue
            sql, _, _ = self._compiled(_one_row_insert(table, names))
            cursor = self._connection.cursor()
            try:
                cursor.executemany(sql, alike)
            finally:
                cursor.close()

    def _cursor(self, statement: sa.ClauseElement, parameters: Mapping[str, Any]) -> Any:
        sql, literals, positions = self._compiled(statement)
        values = {**literals, **parameters} if literals else parameters
        # Connection.execute (sqlite3 and psycopg have it): one call less than cursor().
        return self._connection.execute(
            sql, values if positions is None else [values[n] for n in positions]
        )


Rows = Sequence[Mapping[str, Any]]


def rows_by_keys(rows: Rows) -> dict[tuple[str, ...], list[Mapping[str, Any]]]:
    """The rows grouped by their keys (one INSERT's columns each)."""
    alike: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        alike.setdefault(tuple(row), []).append(row)
    return alike


@functools.lru_cache(maxsize=ROWS_PER_INSERT)
def _qmark_insert(table: sa.Table, names: tuple[str, ...], count: int) -> str:
    # Plain text: compiling a statement of 256 rows of VALUES through SQLAlchemy takes
    # milliseconds, and the values are bound by position (naming each one, ``r3_task``,
    # cost more than SQLite took to insert the row).
    row = "(" + ", ".join("?" * len(names)) + ")"
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES " + ", ".join([row] * count)


@functools.lru_cache(maxsize=32)
def _one_row_insert(table: sa.Table, names: tuple[str, ...]) -> sa.TextClause:
    # Text, because its parameters carry the columns' own names (the rows' keys, bound
    # as they are); SQLAlchemy reserves those names in an insert().
    values = ", ".join(f":{name}" for name in names)
    return sa.text(f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({values})")


Operation = Callable[[Tx], T]
# SQL, the values it carries, and the names of its parameters in order when the dialect's
# paramstyle is positional (SQLite's qmark: a multi-row INSERT binds twice as fast as by
# name), else None.
Compiled = tuple[str, dict[str, Any], tuple[str, ...] | None]


class Compiler:
    """``statement → (sql, literal values)`` for one dialect, remembered for the statements
    used most (a bounded map: statements built per call are compiled each time).  Used
    from a driver's threads at once: a hit reads the map, a miss changes it under a lock
    (two threads evicting at once would both delete the same oldest entry)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._kept: dict[sa.ClauseElement, Compiled] = {}
        self._changing = threading.Lock()

    def __call__(self, statement: sa.ClauseElement) -> Compiled:
        found = self._kept.get(statement)
        if found is not None:
            return found
        compiled = cast(SQLCompiler, statement.compile(dialect=self.dialect))
        if compiled.post_compile_params:
            # An IN list of values (a statement built per call): rendered out in full.
            compiled = cast(
                SQLCompiler,
                statement.compile(
                    dialect=self.dialect, compile_kwargs={"render_postcompile": True}
                ),
            )
        # The caller binds the required parameters; the rest carry their values.
        required = {bind.key for bind in compiled.binds.values() if bind.required}
        literals = {name: value for name, value in compiled.params.items() if name not in required}
        positions = None if compiled.positiontup is None else tuple(compiled.positiontup)
        result = (str(compiled), literals, positions)
        with self._changing:
            if len(self._kept) >= COMPILED_KEPT:
                del self._kept[next(iter(self._kept))]
            self._kept[statement] = result
        return result


class Driver(Protocol):
    """What the repository needs of a database engine (see the module docstring)."""

    @property
    def dialect(self) -> Dialect: ...

    async def read(self, op: Operation[T], *, quick: bool = False) -> T: ...

    async def write(self, op: Operation[T], *, batched: bool = True) -> T: ...

    async def insert(self, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> None: ...

    async def close(self) -> None: ...


# -- group commit ------------------------------------------------------------------------


@dataclass
class GroupCommitStats:
    """Counters of the group commit: writes / transactions is the mean batch size."""

    transactions: int = 0
    rows: int = 0


class Batches(Generic[Item, Result]):
    """Writes that arrive while one transaction commits all go into the next.

    A commit is a flush to disk (SQLite's synchronous=FULL, PostgreSQL's WAL): a
    transaction per submit, claim or outcome would cap them at the disk's flush rate and
    queue them behind each other.
    ``commit`` writes a batch in one transaction and returns one result per item, in
    order.  Each caller is answered only after the commit that holds its item (a 202
    still means "durable").  A batch that fails is rolled back and its items retried one
    transaction each, so one bad item never fails the others; a database that cannot be
    written at all (``StorageUnavailable``) fails them all at once.  The batch runs in a
    task of its own, so a caller that goes away (a client disconnecting) never cancels
    the others' commit.
    """

    def __init__(self, commit: Callable[[list[Item]], Awaitable[list[Result]]], limit: int) -> None:
        self._commit = commit
        self._limit = limit
        self._queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.stats = GroupCommitStats()

    async def run(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def drain(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])  # wait() never raises the task's outcome

    async def _flush(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued[: self._limit], self._queued[self._limit :]
                try:
                    results = await self._counted([item for item, _ in batch])
                except StorageUnavailable as exc:
                    # Locked past the busy timeout, disk full, unreachable: one by one
                    # would only wait that long again.
                    for _, future in batch:
                        _answer(future, exc)
                    continue
                except Exception as exc:
                    if len(batch) == 1:
                        _answer(batch[0][1], exc)
                        continue
                    log.debug("a batch of %d writes failed (%s); one by one", len(batch), exc)
                    for item, future in batch:
                        try:
                            (result,) = await self._counted([item])
                        except Exception as one:
                            _answer(future, one)
                        else:
                            _answer(future, result)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    _answer(future, result)
        finally:
            # Cancelled (the loop is closing): nobody is left waiting forever.
            for _, future in batch + self._queued:
                if not future.done():
                    future.cancel()

    async def _counted(self, items: list[Item]) -> list[Result]:
        results = await self._commit(items)
        self.stats.transactions += 1
        self.stats.rows += len(items)
        return results


def _answer(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller went away; the write is committed all the same
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
