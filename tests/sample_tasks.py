"""Task functions the tests register (imported in the server and in job processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def add(a: int, b: int = 0) -> int:
    return a + b


def echo(text: str, times: int = 1) -> dict[str, object]:
    print(f"echo {text}", flush=True)
    return {
        "text": text * times,
        "job": os.environ["JOBSERVER_JOB_ID"],
        "attempt": int(os.environ["JOBSERVER_ATTEMPT"]),
    }


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail(message: str = "it broke") -> None:
    raise ValueError(message)


def die(signum: int = 9) -> None:
    os.kill(os.getpid(), signum)


def exit_with(code: int) -> None:
    sys.stdout.flush()
    os._exit(code)


def unserializable() -> object:
    return {1, 2}


def flaky(marker_dir: str, failures: int) -> str:
    """Fails the first ``failures`` attempts (counted by files in ``marker_dir``)."""
    directory = Path(marker_dir)
    directory.mkdir(parents=True, exist_ok=True)
    seen = len(list(directory.iterdir()))
    (directory / f"attempt-{seen + 1}").touch()
    if seen < failures:
        raise RuntimeError(f"flaky failure {seen + 1}")
    return f"succeeded after {seen} failures"


def spawn_and_sleep(pid_file: str, seconds: float = 60) -> None:
    """Starts a grandchild (same process group) and records its pid, then sleeps."""
    child = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(seconds)


def ignore_sigterm(seconds: float = 60) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def wait_for_file(path: str, timeout: float = 60) -> str:
    """Runs until ``path`` exists: lets a test decide when the job ends."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    return Path(path).read_text()


def hold_memory(mib: int, path: str = "", seconds: float = 60) -> int:
    """Allocates and touches ``mib`` MiB, then holds it until ``path`` exists (or for
    ``seconds``): a job whose real memory use the test controls."""
    block = bytearray(mib * 1024 * 1024)
    for offset in range(0, len(block), 4096):  # touch every page: resident, not just mapped
        block[offset] = 1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (path and Path(path).exists()):
        time.sleep(0.02)
    return len(block) // (1024 * 1024)


def cuda_devices() -> str | None:
    """The GPUs the scheduler gave this job."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
