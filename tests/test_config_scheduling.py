"""The resource-aware scheduling keys of config.toml: values, defaults and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobserver.config import SchedulerSettings, apply_changes, load
from jobserver.errors import ConfigError

MiB = 2**20
TASK = '[tasks.t]\nfunction = "pkg.mod:fn"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_scheduling_keys_load(tmp_path: Path) -> None:
    settings = load(
        write(
            tmp_path,
            """
[scheduler]
default_memory = "128MiB"
memory_floor = "1GiB"
memory_pressure_limit = 35
cpu_pressure_limit = 80.5
hysteresis = 0.2
starvation_after = "10m"
pressure_action = "pause"
max_pressure_requeues = 1
learn_percentile = 99
learn_margin = 1.5
learn_window = 50
job_cgroups = false

[tasks.t]
function = "pkg.mod:fn"
memory_limit = "2GiB"
max_concurrency = 2
exclusive = true
""",
        )
    )
    s = settings.scheduler
    assert (s.default_memory, s.memory_floor) == (128 * MiB, 1024 * MiB)
    assert (s.memory_pressure_limit, s.cpu_pressure_limit, s.hysteresis) == (35.0, 80.5, 0.2)
    assert (s.starvation_after, s.pressure_action, s.max_pressure_requeues) == (600.0, "pause", 1)
    assert (s.learn_percentile, s.learn_margin, s.learn_window) == (99.0, 1.5, 50)
    assert s.job_cgroups is False
    task = settings.tasks["t"]
    assert (task.memory, task.memory_limit, task.max_concurrency, task.exclusive) == (
        None,
        2048 * MiB,
        2,
        True,
    )


def test_off_switches(tmp_path: Path) -> None:
    text = '[scheduler]\nmemory_pressure_limit = "off"\nstarvation_after = "off"\n'
    s = load(write(tmp_path, text)).scheduler
    assert s.memory_pressure_limit is None and s.starvation_after is None
    assert SchedulerSettings().memory_pressure_limit == 20.0


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            "[scheduler]\nmemory_pressure_limit = 120\n",
            "scheduler.memory_pressure_limit",
            "from 0 to 100",
        ),
        (
            '[scheduler]\ncpu_pressure_limit = "high"\n',
            "scheduler.cpu_pressure_limit",
            '(or "off")',
        ),
        ("[scheduler]\nhysteresis = 2\n", "scheduler.hysteresis", "from 0 to 1"),
        ("[scheduler]\nstarvation_after = 0\n", "scheduler.starvation_after", "greater than 0"),
        (
            '[scheduler]\npressure_action = "kill"\n',
            "scheduler.pressure_action",
            "requeue, pause, none",
        ),
        ("[scheduler]\nmax_pressure_requeues = -1\n", "scheduler.max_pressure_requeues", ">= 0"),
        ("[scheduler]\nlearn_percentile = 0\n", "scheduler.learn_percentile", "from 1 to 100"),
        ("[scheduler]\nlearn_margin = 0.5\n", "scheduler.learn_margin", "from 1 to 10"),
        ("[scheduler]\nlearn_window = 0\n", "scheduler.learn_window", "between 1 and 10000"),
        ('[scheduler]\nmemory_floor = "lots"\n', "scheduler.memory_floor", "expected a size"),
        ("[scheduler]\ndefault_memory = 0\n", "scheduler.default_memory", "greater than 0"),
        ('[scheduler]\njob_cgroups = "yes"\n', "scheduler.job_cgroups", "true or false"),
        (TASK + "memory_limit = 0\n", "tasks.t.memory_limit", "greater than 0"),
        (TASK + "max_concurrency = 0\n", "tasks.t.max_concurrency", ">= 1"),
        (TASK + 'exclusive = "yes"\n', "tasks.t.exclusive", "true or false"),
    ],
)
def test_bad_scheduling_values_name_the_key(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert info.value.details["key"] == key
    assert message in info.value.message


def test_apply_changes_is_all_or_nothing(tmp_path: Path) -> None:
    settings = load(write(tmp_path, TASK))
    with pytest.raises(ConfigError):
        apply_changes(
            settings, {"scheduler": {"max_jobs": 3, "hysteresis": 5}}, "PATCH /api/v1/system"
        )
    assert settings.scheduler.max_jobs == 64
    changed = apply_changes(
        settings,
        {"scheduler": {"max_cpus": 2, "max_memory": None}, "tasks": {"t": {"exclusive": True}}},
        "PATCH /api/v1/system",
    )
    assert changed.scheduler.max_cpus == 2.0 and changed.tasks["t"].exclusive is True
    assert settings.tasks["t"].exclusive is False
