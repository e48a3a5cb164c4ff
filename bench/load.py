"""Load: many concurrent clients submit no-op jobs while others poll and jobs run.

    python bench/load.py                       # starts its own server, 10,000 jobs
    python bench/load.py --jobs 50000 --clients 100
    python bench/load.py --url http://127.0.0.1:8000 --task noop   # an existing server

Reports throughput and checks what issue 5 promises under load: zero lost jobs (every 202
is in the database), zero 5xx answers, zero duplicate ids.  Exit code 1 if any fails.
The suite runs a smaller copy of this (tests/test_load.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Report:
    accepted: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    polls: int = 0
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def duplicates(self) -> int:
        return len(self.accepted) - len(set(self.accepted))

    def summary(self) -> str:
        rate = len(self.accepted) / self.seconds if self.seconds else 0.0
        return (
            f"{len(self.accepted)} jobs accepted in {self.seconds:.1f} s ({rate:.0f}/s), "
            f"{self.polls} polls, statuses {dict(self.statuses)}, "
            f"{self.server_errors} 5xx, {self.duplicates} duplicate ids, "
            f"{len(self.errors)} transport errors"
            + (f" (first: {self.errors[:3]})" if self.errors else "")
        )


async def run_load(
    url: str,
    *,
    jobs: int,
    clients: int = 50,
    pollers: int = 10,
    task: str = "noop",
    args: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Report:
    report = Report()
    done = asyncio.Event()
    # Idle connections expire on the client before uvicorn closes them (after 5 s): a
    # request sent on a connection the server is closing would be lost in transit.
    limits = httpx.Limits(
        max_connections=clients + pollers,
        max_keepalive_connections=clients + pollers,
        keepalive_expiry=1.0,
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, headers=headers) as http:

        async def submitter(count: int) -> None:
            for _ in range(count):
                try:
                    response = await http.post(
                        "/api/v1/jobs", json={"task": task, "args": args or {}}
                    )
                except httpx.HTTPError as exc:
                    report.errors.append(f"POST: {exc!r}")
                    continue
                report.statuses[response.status_code] += 1
                if response.status_code == 202:
                    report.accepted.append(response.json()["id"])

        async def poller(seed: int) -> None:
            rng = random.Random(seed)
            while not done.is_set():
                try:
                    if report.accepted and rng.random() < 0.8:
                        response = await http.get(f"/api/v1/jobs/{rng.choice(report.accepted)}")
                    else:
                        response = await http.get("/api/v1/jobs", params={"limit": 20})
                except httpx.HTTPError as exc:
                    report.errors.append(f"GET: {exc!r}")
                    continue
                report.statuses[response.status_code] += 1
                report.polls += 1

        shares = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
        started = time.monotonic()
        polling = [asyncio.create_task(poller(i)) for i in range(pollers)]
        await asyncio.gather(*(submitter(n) for n in shares))
        report.seconds = time.monotonic() - started
        done.set()
        await asyncio.gather(*polling)
    return report


def missing_from(database: Path, ids: list[str]) -> list[str]:
    """Accepted ids that are not in the database file."""
    with sqlite3.connect(database) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM jobs")}
    return [job_id for job_id in ids if job_id not in stored]


def _own_server(directory: Path, durability: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = directory / "config.toml"
    config.write_text(
        f'[server]\nport = {port}\naccess_log = false\nlog_level = "warning"\n'
        f'durability = "{durability}"\nshutdown_grace = 0\n\n'
        "[scheduler]\nmax_jobs = 4\n\n"
        '[tasks.noop]\nfunction = "jobserver.demo:noop"\ncpus = 0.1\nmemory = "16MiB"\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "jobserver", "serve", "--config", str(config)],
        stdout=(directory / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"server did not start; see {directory / 'server.log'}")
        time.sleep(0.1)
    return process, url, directory / "data" / "jobserver.db"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pollers", type=int, default=10)
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--task", default="noop")
    parser.add_argument("--durability", default="full", choices=["full", "normal"])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        process = None
        database = None
        url = options.url
        if url is None:
            process, url, database = _own_server(Path(directory), options.durability)
        try:
            report = asyncio.run(
                run_load(
                    url,
                    jobs=options.jobs,
                    clients=options.clients,
                    pollers=options.pollers,
                    task=options.task,
                )
            )
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
        print(report.summary())
        lost = missing_from(database, report.accepted) if database else []
        if database:
            print(f"{len(lost)} accepted jobs missing from the database")
        ok = not lost and not report.server_errors and not report.duplicates
        ok = ok and len(report.accepted) == options.jobs
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
