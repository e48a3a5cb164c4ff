"""Tasks for the fork server tests: each tells how its process was made."""

from __future__ import annotations

import atexit
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# The pid of the process that imported this module: the fork server, when it preloaded
# it; the job process itself, when the job had to import it.
IMPORTED_BY = os.getpid()


def whoami() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "sid": os.getsid(0),
        "pgid": os.getpgid(0),
        "imported_by": IMPORTED_BY,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "cgroup": Path("/proc/self/cgroup").read_text(),
        "job_id": os.environ.get("JOBSERVER_JOB_ID"),
        "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
        "stdout_fd": sys.stdout.fileno(),
    }


def speak(gate: str) -> str:
    """Writes to stdout and stderr without flushing, then waits: the test reads the log
    while the job still runs."""
    print("said on stdout")
    print("said on stderr", file=sys.stderr)
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "spoke"


def leave_work(directory: str) -> str:
    """Leaves a non-daemon thread and an atexit handler behind: an interpreter's exit
    waits for the one and runs the other."""
    folder = Path(directory)

    def late_write() -> None:
        time.sleep(0.2)
        (folder / "thread-done").write_text("yes")

    threading.Thread(target=late_write).start()
    atexit.register(lambda: (folder / "atexit-ran").write_text("yes"))
    sys.stdout.write("no newline at the end")
    return "left"


def leave_child(pid_file: str, gate: str) -> str:
    """Starts a grandchild in the job's process group and returns without waiting for it
    once ``gate`` exists."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(pid_file).write_text(str(child.pid))
    deadline = time.monotonic() + 60
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return "left a child"


def fork_escaped(pid_file: str, seconds: float = 60) -> None:
    """Forks, without exec, a grandchild that leaves the job's process group (setsid)."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(seconds)
        os._exit(0)
    Path(pid_file).write_text(str(pid))
    time.sleep(seconds)


def interrupted() -> None:
    raise KeyboardInterrupt


def length_and_parent(text: str) -> dict[str, int]:
    return {"length": len(text), "ppid": os.getppid()}


def big_result(size: int) -> dict[str, object]:
    """More result than a pipe holds, and what the task sees of the result pipe."""
    try:
        result_fd_inheritable: bool | None = os.get_inheritable(4)
    except OSError:
        result_fd_inheritable = None
    return {"text": "é" * size, "result_fd_inheritable": result_fd_inheritable}


def write_to_result_pipe(data: str, size: int = 1) -> str:
    """Writes ``data`` * ``size`` on the result pipe before returning: what the server
    reads is then no document the job process sent."""
    chunk = data.encode()
    for _ in range(size):
        os.write(4, chunk)
    return "returned"
