"""The module boundaries of shared/STYLE.md, checked on the imports themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import jobserver

PACKAGE = Path(jobserver.__file__).parent

# module -> jobserver modules it may import (directly).
ALLOWED = {
    "errors": set(),
    "jobs": {"errors"},
    "config": {"errors", "jobs"},
    "tasks": {"errors", "config"},
    # The store package: the face (__init__), the repository over the driver seam, and
    # the engines beneath it (store.sqlite, store.postgres).  Outside the package it is one
    # name, "store".
    "store": {
        "store.driver",
        "store.repository",
        "store.schema",
        "store.sqlite",
        "store.postgres",
        "store.kept",
    },
    "store.schema": {"jobs"},
    "store.driver": {"errors"},
    "store.repository": {"errors", "jobs", "store.driver", "store.schema"},
    "store.sqlite": {"errors", "store.driver", "store.schema"},
    # An attempt's end kept in a file while the database cannot take it.
    "store.kept": {"jobs", "store.repository"},
    "store.postgres": {"errors", "store.driver", "store.schema"},
    "resources": {"errors", "jobs"},
    # The runner's layer: output capture, the fork server's client, then launching.
    "capture": {"jobs", "reporting"},
    "forkclient": {"jobs", "forkserver", "capture"},
    "runner": {"errors", "jobs", "reporting", "forkserver", "capture", "forkclient"},
    "backup": {"errors", "store"},
    "cgroups": set(),
    "child": set(),
    # Runs in the fork server and in every job it forks: the child module only.
    "forkserver": {"__init__", "child"},
    "demo": set(),
    "scheduler": {
        "errors",
        "jobs",
        "config",
        "tasks",
        "store",
        "resources",
        "runner",
        "cgroups",
        "events",
    },
    "maintenance": {"errors", "jobs", "store", "resources", "runner", "events"},
    "api": {
        "errors",
        "jobs",
        "store",
        "tasks",
        "access",
        "__init__",
        "events",
        "metrics",
        "dashboard",
        "scheduler",
    },
    "access": {"errors"},
    # Describes api.routes (and the page's route) by endpoint: below api, unlike STYLE.md's
    # table, which lists it with the modules api may use.
    "openapi": {"jobs", "store", "tasks", "api", "dashboard", "__init__"},
    "events": {"jobs"},
    "metrics": {"events", "jobs", "scheduler"},
    "dashboard": set(),
    "client": {"errors"},
    "server": {
        "errors",
        "jobs",
        "config",
        "tasks",
        "store",
        "resources",
        "runner",
        "cgroups",
        "scheduler",
        "maintenance",
        "api",
        "backup",
        "access",
        "openapi",
        "__init__",
        "events",
        "metrics",
    },
    "cli": {"errors", "config", "server", "store", "backup", "access", "__init__", "client"},
    "__main__": {"cli", "child", "forkserver"},
    "build": {"store"},
    "__init__": {"reporting"},
    # What a running task tells the server (progress): imported by every child through
    # __init__, so it imports nothing of ours.
    "reporting": set(),
}
# The runner's layer (capture, forkclient, runner) never speaks SQL or HTTP.
SQL_OR_HTTP = {"sqlalchemy", "sqlite3", "psycopg", "starlette", "httpx", "uvicorn"}
# Third-party or stdlib modules a module must never import.
FORBIDDEN = {
    "api": {"subprocess", "signal", "psutil", "sqlalchemy"},
    "scheduler": {"subprocess", "sqlalchemy", "starlette", "psutil"},
    "capture": SQL_OR_HTTP | {"subprocess"},
    "forkclient": SQL_OR_HTTP | {"subprocess"},
    "runner": SQL_OR_HTTP,
    "resources": {"sqlalchemy", "starlette"},
    "jobs": {"asyncio", "sqlalchemy", "starlette"},
    "tasks": {"sqlalchemy", "starlette", "subprocess"},
    "child": {"sqlalchemy", "starlette", "psutil"},
    "forkserver": {"sqlalchemy", "starlette", "psutil", "asyncio", "httpx", "subprocess"},
    "reporting": {"sqlalchemy", "starlette", "psutil", "asyncio", "httpx"},
    "backup": {"sqlalchemy", "starlette", "subprocess", "sqlite3"},
    # Dialect-neutral: only an engine module speaks to a database library.
    "store.repository": {"sqlite3", "psycopg", "starlette", "psutil", "subprocess"},
    "store.schema": {"sqlite3", "psycopg", "starlette", "psutil", "subprocess"},
    "store.driver": {"sqlite3", "psycopg", "starlette", "psutil", "subprocess"},
    "store.kept": {"sqlite3", "psycopg", "starlette", "psutil", "subprocess"},
    "store.sqlite": {"psycopg", "starlette", "psutil", "subprocess"},
    "store.postgres": {"sqlite3", "starlette", "psutil", "subprocess"},
    "access": {"sqlalchemy", "subprocess", "psutil"},
    # Reads starlette's Route objects (api.routes); never requests or responses.
    "openapi": {"sqlalchemy", "subprocess"},
    "cgroups": {"sqlalchemy", "starlette", "psutil", "subprocess"},
    "events": {"sqlalchemy", "starlette", "psutil", "subprocess"},
    "metrics": {"sqlalchemy", "starlette", "psutil", "subprocess"},
    "dashboard": {"sqlalchemy", "psutil", "subprocess"},
    "client": {"sqlalchemy", "starlette", "psutil", "subprocess", "uvicorn"},
}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "jobserver":
                found.update(f"jobserver.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    """Module name -> file: top-level modules by stem, a package's modules as
    ``package.module`` (its ``__init__`` as the package's own name)."""
    found = {path.stem: path for path in PACKAGE.glob("*.py")}
    for init in PACKAGE.glob("*/__init__.py"):
        package = init.parent.name
        found[package] = init
        for path in init.parent.glob("*.py"):
            if path.name != "__init__.py":
                found[f"{package}.{path.stem}"] = path
    return found


def internal_name(module: str, importer: str) -> str:
    """What an import of ``jobserver.<module>`` counts as: within a package, its modules
    by full name; from outside, the package's name."""
    parts = module.split(".")[1:]
    if len(parts) > 1 and importer.split(".")[0] == parts[0]:
        return ".".join(parts[:2])
    return parts[0]


def test_every_module_is_listed() -> None:
    assert set(modules()) == set(ALLOWED)


def test_modules_import_only_what_their_layer_allows() -> None:
    for name, path in modules().items():
        found = imports_of(path)
        internal = set()
        for module in found:
            if module == "jobserver":
                internal.add("__init__")
            elif module.startswith("jobserver."):
                internal.add(internal_name(module, name))
        internal -= {"__version__"}
        internal = {"__init__" if m == "__version__" else m for m in internal}
        assert internal <= ALLOWED[name], f"{name} imports {internal - ALLOWED[name]}"
        external = {module.split(".")[0] for module in found}
        assert not external & FORBIDDEN.get(name, set()), f"{name} imports {external}"


def test_only_the_postgresql_engine_imports_psycopg() -> None:
    """psycopg belongs to store.postgres alone, as everything PostgreSQL does."""
    for name, path in modules().items():
        if name != "store.postgres":
            external = {module.split(".")[0] for module in imports_of(path)}
            assert "psycopg" not in external, f"{name} imports psycopg"


# Private names we use on purpose: the standard library's (each says why where it is
# used), a namedtuple's public _asdict, and the client's handle on its own Job objects.
PRIVATE_ALLOWED = {
    "os._exit",
    "threading._shutdown",
    "atexit._run_exitfuncs",
    "logging._srcfile",
    "sample._asdict",
    "job._client",
}


def test_no_private_attribute_of_a_library_is_used() -> None:
    """``x._name`` only on ``self``/``cls`` (and the few named above): never on an object
    of aiosqlite, uvicorn, SQLAlchemy or any other library."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") or (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            ):
                continue
            if ast.unparse(node) not in PRIVATE_ALLOWED:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def test_every_package_is_shipped() -> None:
    """pyproject lists packages by name: a new subpackage missing there works in an
    editable install and is absent from a real one."""
    import tomllib

    listed = set(
        tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        "jobserver." + ".".join(init.parent.relative_to(PACKAGE).parts)
        for init in PACKAGE.rglob("__init__.py")
        if init.parent != PACKAGE
    }
    assert found <= listed, f"missing from pyproject.toml's packages: {sorted(found - listed)}"
