"""The single-file binary, built with PyInstaller and run the way a user deploys it: alone
in an empty directory, with an empty environment and a minimal PATH, no Python packages.

Slow (the build takes about a minute), so it is deselected by default: run it with
``pytest -m binary``.  Set JOBSERVER_BINARY to test an already built binary instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from jobserver import __version__
from tests.conftest import free_port, poll_value

pytestmark = pytest.mark.binary

MINIMAL_PATH = "/usr/bin:/bin"


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prebuilt = os.environ.get("JOBSERVER_BINARY")
    if prebuilt:
        return Path(prebuilt).absolute()
    root = tmp_path_factory.mktemp("build")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobserver.build",
            "--dist",
            str(root / "dist"),
            "--work",
            str(root / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"build failed:\n{done.stdout}\n{done.stderr}"
    return root / "dist" / "jobserver"


def run(
    binary: Path, *args: str, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(900)  # the build happens in the fixture, inside this limit
def test_the_binary_alone_serves_runs_jobs_and_stops(binary: Path, tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    deployed = box / "jobserver"
    shutil.copy2(binary, deployed)
    unpack = tmp_path / "tmp"  # where the one-file binary unpacks itself: watched below
    unpack.mkdir()
    env = {"PATH": MINIMAL_PATH, "TMPDIR": str(unpack)}

    version = run(deployed, "--version", cwd=box, env=env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[0] == f"jobserver {__version__}"
    assert "single-file binary" in version.stdout
    assert version.stdout.splitlines()[2].startswith("SQLite 3.")

    init = run(deployed, "init", cwd=box, env=env)
    assert init.returncode == 0, init.stderr
    config_path = box / "config.toml"
    port = free_port()
    text = config_path.read_text()
    text = text.replace("port = 8000", f"port = {port}")
    text = text.replace("# reserve_cpus = 0.25", "reserve_cpus = 0")
    text = text.replace('# poll_interval = "1s"', 'poll_interval = "100ms"')
    # A user task module beside the config (task_paths = ["."]) that needs only the stdlib,
    # and the same module run by another interpreter (python = ...).
    (box / "mytasks.py").write_text(
        "import csv, io, os, sys\n\n"
        "def rows(text: str) -> dict:\n"
        "    return {'rows': list(csv.reader(io.StringIO(text))),\n"
        "            'LD_LIBRARY_PATH': os.environ.get('LD_LIBRARY_PATH')}\n\n"
        "def interpreter() -> str:\n"
        "    return sys.executable\n\n"
        "def square(x: int) -> int:\n"
        "    return x * x\n\n"
        "def pool(n: int) -> list:\n"
        "    import multiprocessing\n"
        "    with multiprocessing.get_context('spawn').Pool(2) as workers:\n"
        "        return workers.map(square, range(n))\n\n"
        "def parent() -> int:\n"
        "    return os.getppid()\n"
    )
    text += (
        '\n[tasks.rows]\nfunction = "mytasks:rows"\ncpus = 0.1\nmemory = "16MiB"\n'
        '\n[tasks.pool]\nfunction = "mytasks:pool"\ncpus = 0.1\nmemory = "16MiB"\n'
        '\n[tasks.parent]\nfunction = "mytasks:parent"\ncpus = 0.1\nmemory = "16MiB"\n'
        f'\n[tasks.interpreter]\nfunction = "mytasks:interpreter"\npython = "{sys.executable}"\n'
        'cpus = 0.1\nmemory = "16MiB"\n'
    )
    config_path.write_text(text)

    # Started from another directory, without --config: the config beside the binary.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(deployed), "serve"], cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll_value(
            lambda: (
                server.poll() is None and httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            ),
            "/healthz",
            60,
            ignoring=httpx.HTTPError,
        )
        # Python tasks are forked by the fork server (`jobserver _forkserver`) once it has
        # imported them.
        fork_server = poll_value(
            lambda: (
                (state := httpx.get(f"{url}/api/v1/system", timeout=5).json()["fork_server"])
                and state["ready"]
                and state["pid"]
            ),
            "the fork server",
            60,
            ignoring=httpx.HTTPError,
        )
        submitted = [
            httpx.post(f"{url}/api/v1/jobs", json=body, timeout=10).json()["id"]
            for body in (
                {"task": "run_long_analysis", "args": {"dataset_id": "smoke", "complexity": 0}},
                {"task": "rows", "args": {"text": "a,b\n1,2\n"}},
                {"task": "interpreter", "args": {}},
                {"task": "pool", "args": {"n": 5}},
                {"task": "parent", "args": {}},
            )
        ]
        jobs = [
            poll_value(
                lambda job_id=job_id: (
                    (job := httpx.get(f"{url}/api/v1/jobs/{job_id}", timeout=5).json())["state"]
                    in ("succeeded", "failed", "cancelled")
                    and job
                ),
                f"job {job_id}",
                120,
                ignoring=httpx.HTTPError,
            )
            for job_id in submitted
        ]
        assert [job["state"] for job in jobs] == ["succeeded"] * 5, jobs
        assert jobs[0]["result"]["dataset_id"] == "smoke"
        # A program the task starts sees the box's libraries, not the binary's bundled ones.
        assert jobs[1]["result"] == {"rows": [["a", "b"], ["1", "2"]], "LD_LIBRARY_PATH": None}
        assert jobs[2]["result"] == sys.executable
        assert jobs[3]["result"] == [0, 1, 4, 9, 16]  # multiprocessing "spawn" workers
        assert jobs[4]["result"] == fork_server
        # Job processes reused the server's unpacked files instead of unpacking again.
        assert len(list(unpack.glob("_MEI*"))) == 1
        assert (box / "data" / "jobserver.db").is_file()  # beside the config, not the cwd
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert list(unpack.glob("_MEI*")) == []  # cleaned up on a clean stop
