"""The code that runs inside a job's process: import the task, call it, hand back the result.

Started by the runner as ``python -m jobserver.child SPEC`` with stdout and stderr going to
the job's log.  The outcome is written to the spec's ``result_path`` (JSON, written to a
temporary name then renamed, so the server never reads half a file):
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message", "traceback"}}``.
The exit code is 0 when the task returned, 1 when it raised.
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
# The cgroup.procs file of the job's own cgroup (a memory_limit the kernel enforces).
CGROUP_ENV = "JOBSERVER_CGROUP_PROCS"


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


def join_cgroup() -> None:
    """Move this process into the job's cgroup before any task code runs, so that
    everything the task starts is inside the limit.  If that fails the job must not run
    unlimited: exit with an error the server reports."""
    procs = os.environ.get(CGROUP_ENV)
    if not procs:
        return
    try:
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))
    except OSError as exc:
        print(f"jobserver: cannot join the job's cgroup {procs}: {exc}", file=sys.stderr)
        raise CgroupJoinFailed(f"could not join the job's cgroup {procs}: {exc}") from exc


class CgroupJoinFailed(Exception):
    pass


def resolve(function: str) -> Any:
    module_name, _, attribute = function.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def run(spec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
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
    die_with_server()
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        join_cgroup()
    except CgroupJoinFailed as exc:
        code, document = 1, _error("CgroupJoinFailed", str(exc))
    else:
        code, document = run(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    write_atomically(Path(spec["result_path"]), document)
    sys.exit(code)


if __name__ == "__main__":
    main()
