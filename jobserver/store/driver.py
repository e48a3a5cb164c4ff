"""The seam between the repository and a database engine: a driver is four methods wide.

The repository writes each job operation once, as a plain function of a transaction
(an ``Operation``): statements built with SQLAlchemy Core, run through ``Tx``.  A driver
decides only *where and how* an operation runs: which connection, which thread, which
transaction mode, whether several writes share one commit.  It knows no job.

- ``read(op, quick=...)``: ``op`` in a read transaction (one consistent snapshot).
  ``quick`` says the operation is a few index lookups, so a driver may run it on the
  event loop itself.
- ``write(op, batched=...)``: ``op`` in a write transaction; when ``batched``, the driver
  may commit it together with other writes (every caller is answered after the commit
  that holds its write).  An operation that raises rolls back its own work only.
- ``close()``: commit what is queued, then release everything.
- ``dialect``: what ``Tx`` compiles statements with.

Errors: a driver raises ``StorageUnavailable`` when the database cannot be used at all
(locked past its timeout, disk full, read-only, unreachable); the domain errors an
operation raises (``NotFound``, ``Conflict``...) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

T = TypeVar("T")
Row = tuple[Any, ...]
COMPILED_KEPT = 256  # statements a driver keeps compiled (those built once, and recent ones)


class Tx:
    """One transaction a driver has begun, on a DB-API connection.

    Statements are compiled for the driver's dialect once and kept (building and
    compiling a statement costs more than SQLite takes to run it); the values they carry
    as literals are merged with the caller's ``parameters``."""

    __slots__ = ("_compiled", "_connection")

    def __init__(self, connection: Any, compiled: Callable[[sa.ClauseElement], Compiled]) -> None:
        self._connection = connection
        self._compiled = compiled

    def rows(self, statement: sa.ClauseElement, parameters: Mapping[str, Any] = {}) -> list[Row]:
        """The rows the statement returns, as tuples."""
        cursor = self._execute(statement, parameters)
        try:
            rows: list[Row] = cursor.fetchall()  # DB-API drivers give tuples by default
            return rows
        finally:
            cursor.close()

    def run(self, statement: sa.ClauseElement, parameters: Mapping[str, Any] = {}) -> int:
        """How many rows the statement changed."""
        cursor = self._execute(statement, parameters)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def _execute(self, statement: sa.ClauseElement, parameters: Mapping[str, Any]) -> Any:
        sql, literals = self._compiled(statement)
        cursor = self._connection.cursor()
        cursor.execute(sql, {**literals, **parameters} if literals else parameters)
        return cursor


Operation = Callable[[Tx], T]
Compiled = tuple[str, dict[str, Any]]


class Compiler:
    """``statement → (sql, literal values)`` for one dialect, remembered for the statements
    used most (a bounded map: statements built per call are compiled each time)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._kept: dict[sa.ClauseElement, Compiled] = {}

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
        result = (str(compiled), literals)
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

    async def close(self) -> None: ...
