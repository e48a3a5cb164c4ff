"""Task functions the tests register (imported in the server and in job processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


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


def hold_memory_in_two(mib: int) -> int:
    """Two processes (this one and a child) each hold ``mib`` MiB at the same moment,
    then both end at once: a tree whose peak is twice its largest process."""
    code = (
        f"b = bytearray({mib} * 2**20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('ready', flush=True)\n"
        "import sys; sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    block = bytearray(mib * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    assert child.stdout is not None and child.stdout.readline() == b"ready\n"
    child.communicate()
    return mib


def ignore_sigterm(seconds: float = 60) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def stubborn(note: str, seconds: float = 60) -> None:
    """Appends a line to ``note`` on every start, then ignores SIGTERM while it sleeps: a
    test counts its runs and can keep a cancel waiting out the kill grace."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(note, "a") as file:
        file.write("started\n")
    time.sleep(seconds)


def wait_for_file(path: str, timeout: float = 60) -> str:
    """Runs until ``path`` exists: lets a test decide when the job ends.  Says so first,
    so that its log exists while it runs."""
    print(f"waiting for {path}", flush=True)
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.02)
    return Path(path).read_text()


# --- lifecycle (issue 4) ---


def report(gate: str, steps: int = 3) -> str:
    """Reports progress, then waits for ``gate`` to exist (the test reads progress while
    the job runs)."""
    from jobserver import progress

    for step in range(steps):
        progress((step + 1) / steps, f"step {step + 1} of {steps}")
        time.sleep(0.06)  # above the child's rate limit, so every step is sent
    print("all reported", flush=True)
    wait_for_file(gate)
    return "reported"


def make_files(names: list[str], link_to: str | None = None) -> int:
    """Leaves one file per name in the output directory (content: the name), and
    optionally a symlink ``link`` pointing at ``link_to``."""
    directory = Path(os.environ["JOBSERVER_OUTPUT_DIR"])
    for name in names:
        (directory / name).write_text(f"content of {name}")
    if link_to is not None:
        (directory / "link").symlink_to(link_to)
    return len(names)


def chatty(lines: int, width: int = 100) -> int:
    for number in range(lines):
        print(f"{number:08d} " + "x" * width)
    return lines


def environment() -> dict[str, str]:
    """The job process's environment, to check the allow-list."""
    return dict(os.environ)


def identity() -> dict[str, object]:
    """Who the job runs as and under which resource limits."""
    import resource

    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "home": os.environ.get("HOME"),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
    }


def big_result(size: int) -> str:
    return "x" * size


def spawn_escaped(pid_file: str, seconds: float = 60) -> None:
    """Starts a grandchild that leaves the job's process group (setsid), then sleeps."""
    child = subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=True
    )
    Path(pid_file).write_text(str(child.pid))
    time.sleep(seconds)


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


def cuda_report() -> dict[str, Any]:
    """What a GPU job sees: its CUDA_VISIBLE_DEVICES and, where PyTorch is installed, the
    devices CUDA shows it and a product of two 256 x 256 matrices of ones computed on it
    (each entry 256, so the sum is 256 ** 3)."""
    report: dict[str, Any] = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import torch  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return report
    ones = torch.ones(256, 256, device="cuda")
    report["device_count"] = torch.cuda.device_count()
    report["sum"] = float((ones @ ones).sum().item())
    return report


def ignore_sigterm_then_say(ready: str, seconds: float = 60) -> None:
    """Ignores SIGTERM, then creates ``ready``: a test that waits for the file knows a
    SIGTERM can no longer end it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready).touch()
    time.sleep(seconds)


def fail_when_file(path: str, timeout: float = 60) -> None:
    """Runs until ``path`` exists, then fails: lets a test decide when a job fails."""
    wait_for_file(path, timeout)
    raise RuntimeError(f"{path} appeared")


def leave_artifact(text: str = "") -> int:
    """Leaves one artifact, ``note.txt``, whatever ``text`` is (safe to fuzz: the name
    is fixed)."""
    (Path(os.environ["JOBSERVER_OUTPUT_DIR"]) / "note.txt").write_text(text)
    return len(text)


def stamp(directory: str, seconds: float = 0.0) -> str:
    """Record when this run of the job started and ended, in a file of its own (job id,
    attempt, pid): a test counts the runs and their overlaps from what the jobs wrote."""
    started = time.time()
    time.sleep(seconds)
    ended = time.time()
    name = f"{os.environ['JOBSERVER_JOB_ID']}-{os.environ['JOBSERVER_ATTEMPT']}-{os.getpid()}"
    path = Path(directory) / name
    path.write_text(f"{started!r} {ended!r}\n")
    return name


def record_run(
    directory: str, seconds: float, first_seconds: float | None = None
) -> dict[str, object]:
    """Runs ``seconds`` (its first attempt ``first_seconds``, if given), writing the time
    every 20 ms to a file of this run's own in ``directory`` (job id, attempt, pid), then
    "end": the runs of one job, and when each was last seen alive, read back by the tests
    that look for overlapping runs."""
    job, attempt = os.environ["JOBSERVER_JOB_ID"], int(os.environ["JOBSERVER_ATTEMPT"])
    path = Path(directory) / f"{job}.{attempt}.{os.getpid()}"
    if attempt == 1 and first_seconds is not None:
        seconds = first_seconds
    start = time.time()
    with path.open("a") as out:
        while True:
            now = time.time()
            out.write(f"{now}\n")
            out.flush()
            if now - start >= seconds:
                break
            time.sleep(0.02)
        out.write("end\n")
    return {"job": job, "attempt": attempt}
