"""Skips: every one goes through ``skip_for_want_of`` (tests/conftest.py), which fails
instead where ``JOBSERVER_REQUIRE`` names what is missing, as .ci/run does for everything
the development and CI machines have."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SKIP_KINDS, TESTS_DIR, required_kinds, skip_for_want_of

REPOSITORY = TESTS_DIR.parent


def outcome(kind: str, reason: str) -> BaseException:
    """What ``skip_for_want_of`` raised (caught here: a skip let through would skip the
    checking test itself instead of failing it)."""
    try:
        skip_for_want_of(kind, reason)
    except (pytest.skip.Exception, pytest.fail.Exception) as raised:
        return raised
    raise AssertionError("skip_for_want_of neither skipped nor failed")


def test_a_skip_is_a_skip_unless_its_kind_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOBSERVER_REQUIRE", raising=False)
    skipped = outcome("sqlite3", "no sqlite3 shell here")
    assert isinstance(skipped, pytest.skip.Exception) and skipped.msg == "no sqlite3 shell here"
    monkeypatch.setenv("JOBSERVER_REQUIRE", "tmpfs, postgresql")
    assert isinstance(outcome("sqlite3", "no sqlite3 shell here"), pytest.skip.Exception)
    monkeypatch.setenv("JOBSERVER_REQUIRE", "tmpfs,sqlite3")
    failed = outcome("sqlite3", "no sqlite3 shell here")
    assert isinstance(failed, pytest.fail.Exception), failed
    assert failed.msg == (
        "no sqlite3 shell here (JOBSERVER_REQUIRE names sqlite3: this machine must have it)"
    )


def test_unknown_kinds_are_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown skip kind 'sqlite'"):
        skip_for_want_of("sqlite", "typo")
    monkeypatch.setenv("JOBSERVER_REQUIRE", "postgres")
    with pytest.raises(pytest.UsageError, match="JOBSERVER_REQUIRE names postgres; known"):
        required_kinds()


@pytest.mark.parametrize("required", [False, True], ids=["allowed", "forbidden"])
def test_a_needs_mark_skips_or_fails_a_whole_run(tmp_path: Path, required: bool) -> None:
    test_file = tmp_path / "test_needing.py"
    test_file.write_text(
        "from tests.conftest import needs\n\n\n"
        '@needs("chromium", True, "pretend Chromium is missing")\n'
        "def test_in_a_browser() -> None:\n"
        "    pass\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop("JOBSERVER_REQUIRE", None)
    if required:
        environment["JOBSERVER_REQUIRE"] = "chromium"
    pytest_command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p"]
    run = subprocess.run(
        [
            *pytest_command,
            "no:cacheprovider",
            "-q",
            "-rs",
            "--rootdir",
            str(tmp_path),
            str(test_file),
        ],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = run.stdout + run.stderr
    if required:
        assert run.returncode == 1, output
        assert "pretend Chromium is missing (JOBSERVER_REQUIRE names chromium" in output
    else:
        assert run.returncode == 0, output
        assert "1 skipped" in output and "pretend Chromium is missing" in output


def test_every_skip_goes_through_the_helper() -> None:
    direct = re.compile(r"pytest\.skip\(|skipif|importorskip|mark\.skip\b|mark\.xfail")
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(TESTS_DIR.glob("*.py"))
        if path.name not in ("conftest.py", Path(__file__).name)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert found == [], "skip through skip_for_want_of or needs (tests/conftest.py)"


def test_ci_requires_every_kind_but_a_gpu() -> None:
    script = (REPOSITORY / ".ci" / "run").read_text()
    (value,) = re.findall(r'^export JOBSERVER_REQUIRE="([^"]*)"', script, re.MULTILINE)
    named = set(value.split("$JOBSERVER_REQUIRE,}")[-1].split(","))
    assert named == SKIP_KINDS - {"gpu"}
