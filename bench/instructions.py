"""``python -m bench.instructions``: CPU instructions per request of jobserver's server,
counted by valgrind's callgrind, for this checkout and others (an older commit's
worktree), in one run.

Instructions do not move with the machine's load the way seconds and requests per second
do (the same run twice gives the same count within a percent or two), so a few percent
between two versions can be told apart on a shared, noisy machine where a throughput
figure cannot.  What they leave out: time spent waiting (fsync, locks, the GIL handed
between threads), the kernel's own work, and cache effects.  Read them beside
``python -m bench``, not instead of it.

Per checkout: ``python -m jobserver serve`` from that checkout's ``.venv`` under
``valgrind --tool=callgrind`` (counting off until the server is ready and warm), with
the same bench tasks and settings, then for each figure: counters zeroed, ``--requests``
requests from ``--clients`` keep-alive connections, counters dumped.  Every thread of
the server process counts (the writer's too); the scheduler's poll interval is an hour
so that its ticks (timed, not caused by requests) stay out of the count.  The event loop
and HTTP implementation are forced to asyncio and h11 on both sides: an older checkout
may not name uvloop and httptools.

Figures: ``submit`` (parked: POST /api/v1/jobs with a day's delay), ``poll`` (GET
/api/v1/jobs/{id} of a queued job), ``unknown`` (GET /api/v1/jobs/{id} of an id never
issued: 404).  Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("submit", "poll", "unknown")
CONFIG = """\
task_paths = ["{root}"]
[server]
host = "127.0.0.1"
port = {port}
database = "{workdir}/jobs.db"
jobs_dir = "{workdir}/jobs"
access_log = true
log_level = "info"
[scheduler]
max_jobs = 128
max_cpus = 2
max_memory = "4GiB"
reserve_cpus = 0
reserve_memory = "0"
poll_interval = "1h"
[tasks.noop]
function = "bench.tasks:noop"
cpus = 0.01
memory = "1MiB"
"""
# Runs the checkout's server with asyncio and h11 forced (argv: checkout, config).
SERVE = """\
import sys
import uvicorn
checkout, config = sys.argv[1], sys.argv[2]
sys.path.insert(0, checkout)
init = uvicorn.Config.__init__
def forced(self, *args, **kwargs):
    kwargs.update(loop="asyncio", http="h11")
    kwargs.pop("ws", None)
    init(self, *args, **kwargs)
uvicorn.Config.__init__ = forced
from jobserver.cli import main
main(["serve", "--config", config])
"""
PARKED = {"task": "noop", "args": {}, "delay": 86400}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client:
    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body)
        headers = {"content-type": "application/json"}
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        return response.status, response.read()


def measure(checkout: Path, python: Path, args: argparse.Namespace) -> dict[str, float]:
    """Instructions per request of each figure for the server of ``checkout``."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    port = free_port()
    (workdir / "config.toml").write_text(CONFIG.format(root=checkout, port=port, workdir=workdir))
    (workdir / "serve.py").write_text(SERVE)
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/callgrind.%p",
        str(python),
        str(workdir / "serve.py"),
        str(checkout),
        str(workdir / "config.toml"),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    with (workdir / "server.log").open("wb") as log:
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
        )
    try:
        wait_ready(server, port)
        client = Client(port)
        status, body = client.request("POST", "/api/v1/jobs", PARKED)
        assert status == 202, body
        job_id = json.loads(body)["id"]
        unknown = "0" * 8 + job_id[8:]
        requests: dict[str, Callable[[Client], tuple[int, bytes]]] = {
            "submit": lambda c: c.request("POST", "/api/v1/jobs", PARKED),
            "poll": lambda c: c.request("GET", f"/api/v1/jobs/{job_id}"),
            "unknown": lambda c: c.request("GET", f"/api/v1/jobs/{unknown}"),
        }
        expected = {"submit": 202, "poll": 200, "unknown": 404}
        for figure in FIGURES:  # warm: statements compiled, caches filled
            for _ in range(50):
                assert requests[figure](client)[0] == expected[figure]

        def control(*options: str) -> None:
            subprocess.run(
                ["callgrind_control", *options, str(server.pid)], check=True, capture_output=True
            )

        control("-i", "on")
        found = {}
        for figure in FIGURES:
            control("-z")
            load(port, requests[figure], expected[figure], args.clients, args.requests)
            control("-d", figure)
            found[figure] = dumped_total(workdir, server.pid) / args.requests
        return found
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_ready(server: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 600  # valgrind makes the start slow
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if Client(port).request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(1)
    raise SystemExit("the server did not start within 600 s")


def load(
    port: int,
    request: Callable[[Client], tuple[int, bytes]],
    expected: int,
    clients: int,
    total: int,
) -> None:
    failures: list[str] = []

    def run() -> None:
        client = Client(port)
        for _ in range(total // clients):
            status, body = request(client)
            if status != expected:
                failures.append(f"{status}: {body[:200]!r}")

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")


def dumped_total(workdir: Path, pid: int) -> int:
    """Instructions in the newest dump (every thread's part of it)."""
    dumps = glob.glob(f"{workdir}/callgrind.{pid}.*")
    newest = max(dumps, key=os.path.getmtime)
    suffix = newest.rsplit(".", 1)[1].split("-")[0]
    return sum(
        int(match.group(1))
        for path in glob.glob(f"{workdir}/callgrind.{pid}.{suffix}*")
        for match in re.finditer(r"^summary: (\d+)", Path(path).read_text(), re.M)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkout",
        action="append",
        type=Path,
        help="a jobserver checkout with its own .venv (repeat; default: this one). "
        "The first is the baseline of the ratios",
    )
    parser.add_argument("--clients", type=int, default=25)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1, help="checkouts alternate each round")
    parser.add_argument("--output", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    checkouts = [c.resolve() for c in args.checkout or [ROOT]]
    results: dict[str, list[dict[str, float]]] = {str(c): [] for c in checkouts}
    for _ in range(args.rounds):
        for checkout in checkouts:
            python = checkout / ".venv" / "bin" / "python"
            figures = measure(checkout, python if python.exists() else Path(sys.executable), args)
            results[str(checkout)].append(figures)
            shown = ", ".join(f"{f} {v:,.0f}" for f, v in figures.items())
            print(f"{checkout}: {shown} instructions per request", flush=True)
    baseline = results[str(checkouts[0])]
    for checkout in checkouts[1:]:
        for figure in FIGURES:
            mine = sorted(r[figure] for r in results[str(checkout)])
            base = sorted(r[figure] for r in baseline)
            ratio = mine[len(mine) // 2] / base[len(base) // 2]
            print(f"{figure}: {checkout.name} / {checkouts[0].name} = {ratio:.3f} (medians)")
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
