"""Issue 17: the schemathesis CLI (its documented interface) runs every phase (examples,
coverage, fuzzing, stateful: the links lead from a submit to the operations on that
job), every check (positive_data_acceptance and negative_data_rejection included) and
both generation modes against a real server.  Its HAR report says which status each
request got: every operation must answer a 2xx at least once, or the fuzz never reached
it.  The admin operations change the scheduler: they are fuzzed on a server of their own.
tests/fuzz_hooks.py keeps submits that run now, so the streams on a job end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from jobserver.access import create_token
from tests.conftest import SAMPLE_TASKS, ServerProcess, start_server, write_config

# Quick tasks only: a job that stays running or queued holds its streams open.
FUZZ_SERVER_TASKS = {
    **{name: SAMPLE_TASKS[name] for name in ("add", "echo", "fail")},
    "leave_artifact": {"function": "sample_tasks:leave_artifact", "cpus": 0.1, "memory": "16MiB"},
}
# Small enough for CI's two cores, enough to reach every operation.
FUZZ_EXAMPLES = int(os.environ.get("JOBSERVER_FUZZ_EXAMPLES", "40"))
FUZZ_SEED = os.environ.get("JOBSERVER_FUZZ_SEED", "20261204")
HOOKS = "tests.fuzz_hooks"
CONFIG = Path(__file__).parent / "fuzz_schemathesis.toml"


@dataclass
class FuzzRun:
    returncode: int
    output: str
    statuses: dict[str, Counter[int]]  # "METHOD /path/{template}" -> status counts

    def never_2xx(self) -> list[str]:
        return sorted(
            label
            for label, counts in self.statuses.items()
            if not any(200 <= status < 300 for status in counts)
        )


def run_schemathesis(
    server: ServerProcess,
    directory: Path,
    *options: str,
    token: str | None = None,
    owner: str | None = None,
) -> FuzzRun:
    """``st run`` against ``server`` with ``options`` (filters), sending ``token``; the
    statuses per operation.  ``owner``: the token whose job has the artifact, if not
    ``token``."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    report = directory / f"fuzz-{len(list(directory.glob('fuzz-*')))}.har"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        f"--config-file={CONFIG}",
        "run",
        f"{server.url}/openapi.json",
        "--mode=all",
        # The admin operations have no links between them: no stateful phase for them.
        *(
            []
            if "--phases" in " ".join(options)
            else ["--phases=examples,coverage,fuzzing,stateful"]
        ),
        f"--max-examples={FUZZ_EXAMPLES}",
        f"--seed={FUZZ_SEED}",
        "--workers=1",
        "--generation-database=none",
        "--request-timeout=20",
        "--no-color",
        "--report=har",
        f"--report-har-path={report}",
        *(["--header", f"Authorization: Bearer {token}"] if token else []),
        *options,
    ]
    environment = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": HOOKS,
        "JOBSERVER_FUZZ_ARTIFACT_JOB": job_with_an_artifact(server, owner or token),
    }
    # In the test's directory (schemathesis keeps a cache where it runs); the hooks are
    # imported from the repository.
    root = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        env=environment,
        cwd=directory,
    )
    templates = [
        (method.upper(), path, re.compile(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(path))))
        for path, item in document["paths"].items()
        for method in item
    ]
    statuses: dict[str, Counter[int]] = {}
    entries = json.loads(report.read_text())["log"]["entries"] if report.exists() else []
    for entry in entries:
        method, url = entry["request"]["method"], urlsplit(entry["request"]["url"]).path
        for template_method, path, pattern in templates:
            if method == template_method and pattern.fullmatch(url):
                label = f"{method} {path}"
                statuses.setdefault(label, Counter())[entry["response"]["status"]] += 1
                break
    return FuzzRun(done.returncode, done.stdout + done.stderr, statuses)


def job_with_an_artifact(server: ServerProcess, token: str | None) -> str:
    """A finished job that left ``note.txt`` (see fuzz_schemathesis.toml)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"task": "leave_artifact", "args": {"text": "a note"}}
    job = httpx.post(f"{server.url}/api/v1/jobs", json=body, headers=headers, timeout=10)
    assert job.status_code == 202, job.text
    job_id = str(job.json()["id"])
    done = httpx.get(f"{server.url}/api/v1/jobs/{job_id}?wait=30", headers=headers, timeout=40)
    while done.json()["state"] != "succeeded":
        assert not done.json()["finished_at"], done.text
        done = httpx.get(f"{server.url}/api/v1/jobs/{job_id}?wait=30", headers=headers, timeout=40)
    return job_id


def described_operations(server: ServerProcess, *, admin: bool) -> set[str]:
    """The operations the admin scope guards (they see or change the scheduler), or the
    others."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method, operation in item.items()
        # schemathesis leaves out the document's own path
        if path != "/openapi.json" and (operation.get("x-required-scope") == "admin") == admin
    }


def only(server: ServerProcess, *, admin: bool) -> list[str]:
    """The schemathesis options that select those operations."""
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    selected = [
        f"--include-operation-id={operation_id(document, label)}"
        for label in described_operations(server, admin=admin)
    ]
    return selected if admin else [*selected, "--phases=examples,coverage,fuzzing,stateful"]


def assert_fuzz_holds(run: FuzzRun, operations: set[str]) -> None:
    assert run.returncode == 0, run.output[-20000:]
    assert set(run.statuses) == operations, (sorted(set(run.statuses)), sorted(operations))
    assert not run.never_2xx(), (
        f"never answered a 2xx (the fuzz did not reach them): {run.never_2xx()}: "
        f"{ {label: dict(run.statuses[label]) for label in run.never_2xx()} }"
    )


def fuzz_server(directory: Path, **server: Any) -> ServerProcess:
    directory.mkdir(exist_ok=True)
    return start_server(
        write_config(
            directory,
            server={"max_body_size": "64KiB", **server},
            scheduler={"max_jobs": 2},
            # A failed job's retry comes at once: a job waiting to retry holds its streams.
            jobs={"retry_base": "10ms", "retry_cap": "10ms"},
            tasks=FUZZ_SERVER_TASKS,
        )
    )


@contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)
        if server.process.poll() is None:
            server.process.kill()
    assert "Traceback" not in server.log(), server.log()[-5000:]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_an_anonymous_server_does_what_its_document_says(tmp_path: Path) -> None:
    """On loopback without tokens the document declares no security, and the server holds
    to it: every operation reached with a 2xx, no check failing."""
    with running(fuzz_server(tmp_path / "jobs")) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert "security" not in document
        run = run_schemathesis(server, tmp_path, *only(server, admin=False))
        assert_fuzz_holds(run, described_operations(server, admin=False))
    # The admin operations change the scheduler: on a server of their own.
    with running(fuzz_server(tmp_path / "admin")) as server:
        run = run_schemathesis(
            server, tmp_path, *only(server, admin=True), "--phases=examples,coverage,fuzzing"
        )
        assert_fuzz_holds(run, described_operations(server, admin=True))


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_server_with_tokens_does_what_its_document_says(tmp_path: Path) -> None:
    """With tokens the guarded operations declare bearer security, 401 and 403; the fuzz
    sends a client token (schemathesis adds requests with a wrong or no token: 401), and a
    read-only token on every operation that changes something gets 403."""
    tokens: dict[str, str] = {}
    for directory in ("jobs", "admin"):
        (tmp_path / directory).mkdir()
        path = tmp_path / directory / "tokens.json"
        tokens[directory] = create_token(path, "client", ["submit", "read", "cancel"])
        tokens[f"{directory}-reader"] = create_token(path, "reader", ["read"])
        tokens[f"{directory}-admin"] = create_token(path, "admin", ["admin"])
    with running(fuzz_server(tmp_path / "jobs")) as server:
        document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
        assert document["security"] == [{"bearer": []}]
        operations = described_operations(server, admin=False)
        run = run_schemathesis(server, tmp_path, *only(server, admin=False), token=tokens["jobs"])
        assert_fuzz_holds(run, operations)
        assert all(401 in run.statuses[label] for label in operations if guarded(document, label))
        writes = sorted(label for label in operations if not label.startswith("GET "))
        run = run_schemathesis(
            server,
            tmp_path,
            *(f"--include-operation-id={operation_id(document, label)}" for label in writes),
            "--phases=examples,coverage,fuzzing",
            token=tokens["jobs-reader"],
            owner=tokens["jobs"],
        )
        assert run.returncode == 0, run.output[-20000:]
        assert set(run.statuses) == set(writes)
        assert all(403 in run.statuses[label] for label in writes), run.statuses
    with running(fuzz_server(tmp_path / "admin")) as server:
        run = run_schemathesis(
            server,
            tmp_path,
            *only(server, admin=True),
            "--phases=examples,coverage,fuzzing",
            token=tokens["admin-admin"],
        )
        assert_fuzz_holds(run, described_operations(server, admin=True))


def guarded(document: dict[str, Any], label: str) -> bool:
    method, path = label.split(" ", 1)
    return bool(document["paths"][path][method.lower()].get("security"))


def operation_id(document: dict[str, Any], label: str) -> str:
    method, path = label.split(" ", 1)
    return str(document["paths"][path][method.lower()]["operationId"])
