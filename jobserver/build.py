"""Build the single-file executable ``dist/jobserver``: ``python -m jobserver.build``.

Needs the ``build`` extra (``pip install '.[build]'``, which brings PyInstaller) and runs
from an environment where jobserver is installed, so that everything is collected from
what is installed:

- the interpreter, the dependencies and the whole standard library (task modules loaded
  from ``task_paths`` at run time may import any stdlib module, which PyInstaller's import
  analysis could not foresee);
- every data file of the ``jobserver`` package (the starter ``config.toml``, ``child.py``
  as a file for tasks with their own interpreter, the web page's static files) and the
  Alembic migrations as plain files, which Alembic reads from disk.

The result runs on Linux machines of the same architecture with a glibc at least as new
as the build machine's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from jobserver.store import migrations_dir

# Stdlib packages left out: GUI toolkits, the test suite and tools that make no sense
# inside a server binary (or that need files PyInstaller cannot collect).
_STDLIB_EXCLUDED = {
    "antigravity",
    "distutils",  # deprecated; setuptools replaces it with its own copy
    "ensurepip",
    "idlelib",
    "lib2to3",
    "pydoc_data",
    "test",
    "this",
    "tkinter",
    "turtle",
    "turtledemo",
    "venv",
}


def stdlib_modules() -> list[str]:
    """Top-level stdlib modules to bundle whole (``_``-private ones come with them)."""
    return sorted(
        name
        for name in sys.stdlib_module_names
        if not name.startswith("_") and name not in _STDLIB_EXCLUDED
    )


def pyinstaller_arguments(dist: Path, work: Path) -> list[str]:
    entry = Path(str(resources.files("jobserver").joinpath("__main__.py")))
    arguments = [
        str(entry),
        "--onefile",
        "--name",
        "jobserver",
        "--distpath",
        str(dist),
        "--workpath",
        str(work),
        "--specpath",
        str(work),
        "--noconfirm",
        "--log-level",
        "WARN",
        # Every data file of the package, whatever lands there later (static web files).
        "--collect-data",
        "jobserver",
        "--hidden-import",
        "jobserver.demo",
        # Loaded by name at run time, invisible to PyInstaller's import analysis:
        "--hidden-import",
        "sqlalchemy.dialects.sqlite.pysqlite",
        "--collect-submodules",
        "uvicorn",
        # The event loop and HTTP parser server.py names; uvicorn imports them by name.
        "--collect-submodules",
        "uvloop",
        "--collect-submodules",
        "httptools",
    ]
    # Found through store (not importlib) so an editable install, where the package maps to
    # the repository's migrations/, works too.
    migrations = migrations_dir()
    data = [(resources.files("jobserver").joinpath("child.py"), Path("jobserver"))]
    data += [
        (file, Path("jobserver/migrations") / file.parent.relative_to(migrations))
        for file in sorted(migrations.rglob("*"))
        if file.is_file() and "__pycache__" not in file.parts
    ]
    for source, target in data:
        arguments += ["--add-data", f"{source}{os.pathsep}{target}"]
    for module in stdlib_modules():
        arguments += ["--collect-submodules", module]
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobserver.build", description="Build the single-file dist/jobserver."
    )
    parser.add_argument("--dist", type=Path, default=Path("dist"), help="output directory")
    parser.add_argument(
        "--work", type=Path, default=Path("build/pyinstaller"), help="PyInstaller's scratch space"
    )
    args = parser.parse_args(argv)
    try:
        import PyInstaller.__main__
    except ModuleNotFoundError:
        print("PyInstaller is missing: pip install '.[build]'", file=sys.stderr)
        return 2
    started = time.monotonic()
    PyInstaller.__main__.run(pyinstaller_arguments(args.dist.absolute(), args.work.absolute()))
    binary = args.dist / "jobserver"
    size = binary.stat().st_size / 1024**2
    print(f"built {binary} ({size:.1f} MiB) in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
