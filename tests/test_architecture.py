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
    "config": {"errors"},
    "tasks": {"errors", "config"},
    "store": {"errors", "jobs"},
    "resources": {"errors", "jobs"},
    "runner": {"errors", "jobs", "reporting", "forkserver"},
    "backup": {"errors"},
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
# Third-party or stdlib modules a module must never import.
FORBIDDEN = {
    "api": {"subprocess", "signal", "psutil", "sqlalchemy"},
    "scheduler": {"subprocess", "sqlalchemy", "starlette", "psutil"},
    "runner": {"sqlalchemy", "starlette", "httpx"},
    "resources": {"sqlalchemy", "starlette"},
    "jobs": {"asyncio", "sqlalchemy", "starlette"},
    "tasks": {"sqlalchemy", "starlette", "subprocess"},
    "child": {"sqlalchemy", "starlette", "psutil"},
    "forkserver": {"sqlalchemy", "starlette", "psutil", "asyncio", "httpx", "subprocess"},
    "reporting": {"sqlalchemy", "starlette", "psutil", "asyncio", "httpx"},
    "backup": {"sqlalchemy", "starlette", "subprocess"},
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


def test_every_module_is_listed() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules == set(ALLOWED)


def test_modules_import_only_what_their_layer_allows() -> None:
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        found = imports_of(path)
        internal = set()
        for module in found:
            if module == "jobserver":
                internal.add("__init__")
            elif module.startswith("jobserver."):
                internal.add(module.split(".")[1])
        internal -= {"__version__"}
        internal = {"__init__" if m == "__version__" else m for m in internal}
        assert internal <= ALLOWED[name], f"{name} imports {internal - ALLOWED[name]}"
        external = {module.split(".")[0] for module in found}
        assert not external & FORBIDDEN.get(name, set()), f"{name} imports {external}"
