"""The code that runs inside a job's process: import the task, call it, hand back the result.

Started by the runner as ``python -m jobserver.child SPEC`` with stdout and stderr going to
the job's log.  The outcome is written to the spec's ``result_path`` (JSON, written to a
temporary name then renamed, so the server never reads half a file):
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message", "traceback"}}``.
The exit code is 0 when the task returned, 1 when it raised.

Before any task code is imported, the process applies the spec's resource limits, switches
to the ``run_as`` user if one is set, and asks to die with the server (in that order:
changing credentials clears the parent-death signal).  A result larger than the spec's
``max_result_size`` is replaced by a ``ResultTooLarge`` error.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def die_with_server() -> None:
    """Ask the kernel to SIGKILL us when the server dies, then check it has not already died
    (the request only covers a parent alive at the time of the call)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    expected = os.environ.get("JOBSERVER_SERVER_PID")
    if expected is not None and os.getppid() != int(expected):
        os._exit(137)


RLIMITS = {"nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "core": "RLIMIT_CORE"}


def apply_rlimits(limits: dict[str, int]) -> None:
    """Lower (soft and hard) the resource limits the config asks for, before any task
    code runs; a limit above the current hard limit is capped at it (only root could raise
    it, and jobs should not)."""
    import resource

    for name, value in limits.items():
        which = getattr(resource, RLIMITS[name])
        _soft, hard = resource.getrlimit(which)
        target = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (target, target))


def drop_privileges(user: str) -> None:
    """Become ``user`` (its uid, primary gid and supplementary groups) for good.

    Done here rather than with ``posix_spawn`` (which cannot change users) or
    ``preexec_fn`` (unsafe in the threaded server): this process has one thread and no
    task code has run yet.  Changing credentials clears the parent-death signal, so
    ``die_with_server`` is called after this.
    """
    import pwd

    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)


def resolve(function: str) -> Any:
    module_name, _, attribute = function.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def run(spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    code, document = _run(spec)
    limit = spec.get("max_result_size")
    if code == 0 and limit is not None:
        size = len(json.dumps(document.get("result"), ensure_ascii=False).encode())
        if size > limit:
            message = (
                f"the task returned {size} bytes of JSON; the limit (max_result_size) is "
                f"{limit} bytes: write large output to a file and return its path"
            )
            print(message, file=sys.stderr)
            return 1, _error("ResultTooLarge", message)
    return code, document


def _run(spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        result = resolve(spec["function"])(**spec["args"])
    except SystemExit as stop:
        if stop.code in (0, None):
            return 0, {"ok": True, "result": None}
        return 1, _error("SystemExit", f"the task called sys.exit({stop.code!r})")
    except Exception as exc:
        traceback.print_exc()
        return 1, _error(type(exc).__name__, str(exc), traceback.format_exc())
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        message = f"the task returned a value that is not JSON-serialisable: {exc}"
        print(message, file=sys.stderr)
        return 1, _error("ResultNotSerializable", message)
    return 0, {"ok": True, "result": result}


def _error(kind: str, message: str, trace: str | None = None) -> dict[str, Any]:
    return {"ok": False, "error": {"type": kind, "message": message, "traceback": trace}}


def write_atomically(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, ensure_ascii=False, allow_nan=False))
    os.replace(temporary, path)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    apply_rlimits(spec.get("rlimits") or {})
    if spec.get("run_as"):
        drop_privileges(spec["run_as"])
    die_with_server()
    code, document = run(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    write_atomically(Path(spec["result_path"]), document)
    sys.exit(code)


if __name__ == "__main__":
    main()
