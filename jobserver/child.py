"""The code that runs inside a job's process: import the task, call it, hand back the result.

Started by the runner as ``python -m jobserver.child SPEC`` (in the single-file binary:
``jobserver _child SPEC``; for a task with its own ``python``: that interpreter running a
copy of this file) with stdout and stderr going to the job's log.  The outcome is written
to the result pipe, the fd named by the spec's ``result_fd`` (no file: creating one costs
more than the whole rest of a short job on some disks), as one JSON document:
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type", "message", "traceback"}}``.
The server reads it to the end once the process has exited; a process killed while
writing leaves half a document, which the server treats as no result.
The exit code is 0 when the task returned, 1 when it raised.

``--describe package.module:function`` prints the function's parameters as JSON instead
(annotations as text), so the server can validate arguments for a task whose module it
cannot import itself because it needs packages only that task's interpreter has.

Stdlib only: this file also runs under interpreters that have nothing else installed.

Before any task code is imported, the process applies the spec's resource limits, switches
to the ``run_as`` user if one is set, and asks to die with its parent (in that order:
changing credentials clears the parent-death signal).  A result larger than the spec's
``max_result_size`` is replaced by a ``ResultTooLarge`` error.  ``run_job`` is that whole
sequence; the fork server (forkserver.py) calls it too, in the processes it forks.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import inspect
import json
import os
import signal
import sys
import traceback
from typing import Any

PR_SET_PDEATHSIG = 1
# The cgroup.procs file of the job's own cgroup (a memory_limit the kernel enforces).
CGROUP_ENV = "JOBSERVER_CGROUP_PROCS"
OUTPUT_DIR_ENV = "JOBSERVER_OUTPUT_DIR"  # reporting.OUTPUT_DIR_ENV (this file is stdlib only)


SERVER_PID_ENV = "JOBSERVER_SERVER_PID"


_libc: Any = None


def libc() -> Any:
    """The C library, loaded once (the fork server loads it before forking)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent(expected: int | None) -> None:
    """Ask the kernel to SIGKILL us when our parent dies, then check that the parent is
    still ``expected`` (the request only covers a parent alive at the time of the call).
    The parent is the server, or the fork server for a process it forked."""
    if sys.platform != "linux":
        return
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected is not None and os.getppid() != expected:
        os._exit(137)


def server_pid() -> int | None:
    """The server's pid, as the runner put it in our environment."""
    value = os.environ.get(SERVER_PID_ENV)
    return int(value) if value else None


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
    ``die_with_parent`` is called after this.
    """
    import pwd

    entry = pwd.getpwnam(user)
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ.update(HOME=entry.pw_dir, USER=user, LOGNAME=user)


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


def write_result(fd: int, document: dict[str, Any]) -> None:
    """The outcome, on the result pipe, which is then closed (the server's end of file)."""
    with open(fd, "wb", closefd=True) as pipe:
        pipe.write(json.dumps(document, ensure_ascii=False, allow_nan=False).encode())


def describe(function: str) -> dict[str, Any]:
    """The parameters of ``function``: name, kind, default (if any) and annotation text."""
    params = []
    for p in inspect.signature(resolve(function)).parameters.values():
        annotation = p.annotation
        if annotation is p.empty:
            text = None
        elif isinstance(annotation, str):
            text = annotation
        else:
            text = inspect.formatannotation(annotation)
        entry: dict[str, Any] = {"name": p.name, "kind": p.kind.name, "annotation": text}
        if p.default is not p.empty:
            entry["default"] = p.default
        params.append(entry)
    return {"ok": True, "params": params}


def frozen_setup() -> None:
    """In the single-file binary: add task_paths by hand (its interpreter ignores
    PYTHONPATH, where the runner puts them) and give programs the task starts the
    library path they would have had, not the binary's bundled libraries (this process
    has loaded its own already)."""
    if not getattr(sys, "frozen", False):
        return
    entries = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    sys.path[:0] = [entry for entry in entries if entry and entry not in sys.path]
    original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
    if original is not None:
        os.environ["LD_LIBRARY_PATH"] = original
    else:
        os.environ.pop("LD_LIBRARY_PATH", None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    frozen_setup()
    if argv[:1] == ["--describe"]:
        try:
            document = describe(argv[1])
        except Exception as exc:
            document = _error(type(exc).__name__, str(exc), traceback.format_exc())
        try:
            print(json.dumps(document))
        except (TypeError, ValueError):  # a default that JSON cannot carry
            print(json.dumps(_error("TypeError", "a parameter default is not JSON-serialisable")))
        sys.exit(0 if document["ok"] else 1)
    sys.exit(run_job(read_spec(argv[0]), server_pid()))


def read_spec(path: str) -> dict[str, Any]:
    with open(path, "rb") as file:
        spec: dict[str, Any] = json.loads(file.read())
    return spec


def run_job(spec: dict[str, Any], parent: int | None) -> int:
    """Everything a job process does once it has its spec; returns its exit code.

    ``parent`` is the pid this process must die with (the server, or the fork server that
    forked it)."""
    # Programs the task runs must not get the result pipe: they could forge the outcome.
    os.set_inheritable(spec["result_fd"], False)
    # Join the job's cgroup first: it needs the server's privileges, and everything the
    # task starts must be inside the limit.  If that fails the job must not run unlimited.
    failed = None
    try:
        join_cgroup()
    except CgroupJoinFailed as exc:
        failed = _error("CgroupJoinFailed", str(exc))
    apply_rlimits(spec.get("rlimits") or {})
    if spec.get("run_as"):
        drop_privileges(spec["run_as"])
    die_with_parent(parent)
    output = os.environ.get(OUTPUT_DIR_ENV)
    if output and failed is None:
        # Made here, as the job's user, rather than by the server (issue 6).
        try:
            os.makedirs(output, exist_ok=True)
        except OSError as exc:
            failed = _error("OutputDirFailed", f"could not create {output}: {exc}")
    code, document = (1, failed) if failed is not None else run(spec)
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.suppress(BrokenPipeError):  # the server is gone: nobody to tell
        write_result(spec["result_fd"], document)
    return code


if __name__ == "__main__":
    main()
