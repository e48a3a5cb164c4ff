"""The local commands that need no server: ``--version``, ``init``, and where ``serve``
looks for its config."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from jobserver import __version__, config

SHIPPED = Path(__file__).parent.parent / "config.toml"


def jobserver(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobserver", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != config.ENV_VAR},
    )


def test_version_names_python_and_sqlite() -> None:
    done = jobserver("--version")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0] == f"jobserver {__version__}"
    assert lines[1].startswith(f"Python {sys.version.split()[0]} ")
    assert lines[2] == f"SQLite {sqlite3.sqlite_version}"


def test_init_writes_the_shipped_starter_config(tmp_path: Path) -> None:
    done = jobserver("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "config.toml"
    assert written.read_text() == SHIPPED.read_text()
    assert "jobserver serve --config config.toml" in done.stdout
    settings = config.load(written)  # it is a valid config as written
    assert "run_long_analysis" in settings.tasks


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "jobs.toml"
    target.parent.mkdir()
    target.write_text("# mine\n")
    done = jobserver("init", str(target))
    assert done.returncode == 2
    assert f"{target} already exists; pass --force to replace it" in done.stderr
    assert target.read_text() == "# mine\n"
    assert jobserver("init", str(target), "--force").returncode == 0
    assert target.read_text() == SHIPPED.read_text()


def test_init_into_a_directory(tmp_path: Path) -> None:
    assert jobserver("init", str(tmp_path)).returncode == 0
    assert (tmp_path / "config.toml").read_text() == SHIPPED.read_text()


def test_serve_without_a_config_says_how_to_make_one(tmp_path: Path) -> None:
    done = jobserver("serve", cwd=tmp_path)
    assert done.returncode == 2
    assert "config file not found" in done.stderr
    assert "jobserver init" in done.stderr


def test_config_next_to_the_binary_is_used_when_the_cwd_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    cwd, beside = tmp_path / "cwd", tmp_path / "opt"
    cwd.mkdir()
    beside.mkdir()
    monkeypatch.chdir(cwd)
    assert config.resolve_path(None, beside=beside) == cwd / "config.toml"  # neither exists
    (beside / "config.toml").write_text("")
    assert config.resolve_path(None, beside=beside) == beside / "config.toml"
    (cwd / "config.toml").write_text("")
    assert config.resolve_path(None, beside=beside) == cwd / "config.toml"  # cwd first
    monkeypatch.setenv(config.ENV_VAR, str(tmp_path / "env.toml"))
    assert config.resolve_path(None, beside=beside) == tmp_path / "env.toml"
    assert config.resolve_path("cli.toml", beside=beside) == cwd / "cli.toml"
