from __future__ import annotations

import math
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobserver.config import TaskSettings
from jobserver.errors import ConfigError, UnknownTask, ValidationError
from jobserver.tasks import Param, Registry, Task

PREFIX = "test_tasks_mod_"

Loader = Callable[..., Task]


@pytest.fixture
def task_dir(tmp_path: Path) -> Iterator[Path]:
    """A task_paths directory; sys.path and the modules written into it are restored after."""
    saved_path = list(sys.path)
    yield tmp_path
    sys.path[:] = saved_path
    for name in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[name]


def write_module(directory: Path, source: str) -> str:
    name = PREFIX + uuid.uuid4().hex
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return name


@pytest.fixture
def load(task_dir: Path) -> Loader:
    """load(source, attr="f", **settings): write a module, register its ``attr`` as task "t"."""

    def load(source: str, attr: str = "f", **settings: Any) -> Task:
        module = write_module(task_dir, source)
        tasks = {"t": TaskSettings(name="t", function=f"{module}:{attr}", **settings)}
        return Registry.load(tasks, [task_dir]).get("t")

    return load


def demo_task() -> Task:
    settings = TaskSettings(name="analysis", function="jobserver.demo:run_long_analysis")
    return Registry.load({"analysis": settings}, []).get("analysis")


def details(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    entries = exc.value.details
    assert isinstance(entries, list)
    by_field = {d["field"]: d["message"] for d in entries}
    assert len(by_field) == len(entries), "one entry per field"
    return by_field


def rejects(task: Task, args: object) -> dict[str, str]:
    with pytest.raises(ValidationError) as exc:
        task.validate(args)
    return details(exc)


# --- the demo task ------------------------------------------------------------------------


def test_demo_task_loads_and_validates() -> None:
    task = demo_task()
    assert task.params == (
        Param("dataset_id", "str", True, None),
        Param("complexity", "int", True, None),
    )
    args = {"dataset_id": "data_xyz", "complexity": 3}
    validated = task.validate(args)
    assert validated == args
    assert validated is not args


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", 'expected int, got str "abc"'),
        ("3", 'expected int, got str "3"'),
        (True, "expected int, got bool true"),
        (3.0, "expected int, got float 3.0"),
        (None, "expected int, got None"),
    ],
)
def test_demo_task_rejects_non_int_complexity(value: object, message: str) -> None:
    problems = rejects(demo_task(), {"dataset_id": "d", "complexity": value})
    assert problems == {"complexity": message}


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ValidationError) as exc:
        demo_task().validate({"complexity": "abc", "colour": "red"})
    assert exc.value.message == "invalid arguments for task 'analysis'"
    assert details(exc) == {
        "dataset_id": "field required",
        "complexity": 'expected int, got str "abc"',
        "colour": "unexpected argument; this task takes: dataset_id, complexity",
    }


@pytest.mark.parametrize("args", [None, [], "x", 3, [{"dataset_id": "d"}]])
def test_args_must_be_an_object(args: object) -> None:
    with pytest.raises(ValidationError) as exc:
        demo_task().validate(args)
    assert exc.value.message == "args must be a JSON object"
    assert list(details(exc)) == ["args"]


def test_long_values_are_truncated_in_messages() -> None:
    problems = rejects(demo_task(), {"dataset_id": "d", "complexity": "x" * 500})
    assert len(problems["complexity"]) < 80
    assert problems["complexity"].endswith("...")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(JSON)
def test_demo_complexity_accepts_exactly_ints(value: object) -> None:
    task = demo_task()
    args = {"dataset_id": "d", "complexity": value}
    if isinstance(value, int) and not isinstance(value, bool):
        assert task.validate(args) == args
    else:
        assert list(rejects(task, args)) == ["complexity"]


def test_describe() -> None:
    settings = TaskSettings(
        name="analysis",
        function="jobserver.demo:run_long_analysis",
        cpus=2.0,
        memory=2**30,
        max_retries=3,
        timeout=60.0,
        route="/api/v1/start-analysis",
    )
    task = Registry.load({"analysis": settings}, []).get("analysis")
    assert task.describe() == {
        "name": "analysis",
        "function": "jobserver.demo:run_long_analysis",
        "params": [
            {"name": "dataset_id", "type": "str", "required": True, "default": None},
            {"name": "complexity", "type": "int", "required": True, "default": None},
        ],
        "resources": {"cpus": 2.0, "memory": 2**30},
        "max_retries": 3,
        "timeout": 60.0,
        "route": "/api/v1/start-analysis",
        "kind": "function",
        "command": None,
        "retry_on_timeout": False,
        "retention": None,
    }


def test_other_demo_tasks_load() -> None:
    tasks = {
        "noop": TaskSettings(name="noop", function="jobserver.demo:noop"),
        "fail": TaskSettings(name="fail", function="jobserver.demo:fail"),
    }
    registry = Registry.load(tasks, [])
    assert registry.get("noop").validate({}) == {}
    assert registry.get("fail").params == (Param("message", "str", False, "demo failure"),)


# --- the registry -------------------------------------------------------------------------


def test_registry_lookup_and_routes(task_dir: Path) -> None:
    module = write_module(task_dir, "def a() -> None: ...\ndef b() -> None: ...\n")
    registry = Registry.load(
        {
            "b": TaskSettings(name="b", function=f"{module}:b", route="/run-b"),
            "a": TaskSettings(name="a", function=f"{module}:a"),
        },
        [task_dir],
    )
    assert len(registry) == 2
    assert registry.names() == ["a", "b"]
    assert {t.name for t in registry} == {"a", "b"}
    assert registry.by_route() == {"/run-b": registry.get("b")}
    assert str(task_dir.absolute()) == sys.path[0]
    with pytest.raises(UnknownTask) as exc:
        registry.get("c")
    assert exc.value.message == "unknown task 'c'"
    assert exc.value.details == {"task": "c", "known": ["a", "b"]}


def test_duplicate_routes_are_a_config_error(task_dir: Path) -> None:
    module = write_module(task_dir, "def a() -> None: ...\n")
    with pytest.raises(ConfigError, match="route"):
        Registry.load(
            {
                "a": TaskSettings(name="a", function=f"{module}:a", route="/x"),
                "b": TaskSettings(name="b", function=f"{module}:a", route="/x"),
            },
            [task_dir],
        )


def test_class_attribute_paths(load: Loader) -> None:
    source = """
        class Tools:
            @staticmethod
            def stat(x: int) -> None: ...
            @classmethod
            def klass(cls, y: str) -> None: ...
    """
    assert [p.name for p in load(source, "Tools.stat").params] == ["x"]
    assert [p.name for p in load(source, "Tools.klass").params] == ["y"]


# --- parameters and types ------------------------------------------------------------------


def test_optional_and_default_params(load: Loader) -> None:
    task = load(
        """
        from typing import Optional
        def f(a: int, b: str = "x", c: Optional[int] = None, *, d: list[int] = [1]) -> None: ...
        """
    )
    assert task.params == (
        Param("a", "int", True, None),
        Param("b", "str", False, "x"),
        Param("c", "int | None", False, None),
        Param("d", "list[int]", False, [1]),
    )
    assert task.validate({"a": 1}) == {"a": 1}  # defaults are not filled in
    assert task.validate({"a": 1, "c": None, "d": []}) == {"a": 1, "c": None, "d": []}
    assert rejects(task, {}) == {"a": "field required"}
    assert rejects(task, {"a": 1, "c": "2"}) == {"c": 'expected int | None, got str "2"'}


def test_unannotated_and_any_accept_any_json(load: Loader) -> None:
    task = load("from typing import Any\ndef f(a, b: Any, c: list[Any]) -> None: ...\n")
    assert [p.type for p in task.params] == ["any", "any", "list[any]"]
    args = {"a": None, "b": {"x": [1, "y"]}, "c": [True, 2.5]}
    assert task.validate(args) == args
    assert rejects(task, {"a": 1, "b": 1, "c": {}}) == {"c": "expected list[any], got dict {}"}


def test_containers(load: Loader) -> None:
    task = load(
        """
        def f(xs: list[int], opts: dict[str, float], t: tuple[str, ...], raw: list, m: dict,
              deep: list[dict[str, list[int]]]) -> None: ...
        """
    )
    assert [p.type for p in task.params] == [
        "list[int]",
        "dict[str, float]",
        "tuple[str, ...]",
        "list",
        "dict",
        "list[dict[str, list[int]]]",
    ]
    good = {
        "xs": [1, 2],
        "opts": {"a": 1, "b": 2.5},
        "t": ["a"],
        "raw": [1, "x"],
        "m": {"k": None},
        "deep": [{"a": [1]}],
    }
    assert task.validate(good) == good
    bad = {
        "xs": [1, 2, "x"],
        "opts": {"a": 1, "b": "no"},
        "t": ("a",),  # only JSON arrays (lists), as decoded from JSON
        "raw": {},
        "m": [],
        "deep": [{"a": [1]}, {"b": [1, False]}],
    }
    assert rejects(task, bad) == {
        "xs": 'xs[2]: expected int, got str "x"',
        "opts": 'opts.b: expected float, got str "no"',
        "t": 'expected tuple[str, ...], got tuple ["a"]',
        "raw": "expected list, got dict {}",
        "m": "expected dict, got list []",
        "deep": "deep[1].b[1]: expected int, got bool false",
    }


def test_float_accepts_ints_but_not_bools_or_non_finite(load: Loader) -> None:
    task = load("def f(x: float, xs: list[float] = []) -> None: ...\n")
    assert task.validate({"x": 1}) == {"x": 1}
    assert task.validate({"x": -2.5}) == {"x": -2.5}
    assert rejects(task, {"x": True}) == {"x": "expected float, got bool true"}
    assert rejects(task, {"x": math.nan}) == {"x": "expected a finite float, got float NaN"}
    assert rejects(task, {"x": -math.inf}) == {"x": "expected a finite float, got float -Infinity"}
    assert rejects(task, {"x": 1, "xs": [1.0, math.inf]}) == {
        "xs": "xs[1]: expected a finite float, got float Infinity"
    }


def test_literal_and_union(load: Loader) -> None:
    task = load(
        """
        from typing import Literal, Optional, Union
        def f(mode: Literal["fast", "slow"], level: Literal[1, 2], flag: Literal[True],
              n: Union[int, str], maybe: Optional[list[int]] = None) -> None: ...
        """
    )
    assert [p.type for p in task.params] == [
        "Literal['fast', 'slow']",
        "Literal[1, 2]",
        "Literal[True]",
        "int | str",
        "list[int] | None",
    ]
    good = {"mode": "fast", "level": 2, "flag": True, "n": "x", "maybe": [1]}
    assert task.validate(good) == good
    assert task.validate({**good, "n": 3, "maybe": None}) == {**good, "n": 3, "maybe": None}
    bad = {"mode": "medium", "level": True, "flag": 1, "n": 1.5, "maybe": [1, "2"]}
    assert rejects(task, bad) == {
        "mode": "expected Literal['fast', 'slow'], got str \"medium\"",
        "level": "expected Literal[1, 2], got bool true",
        "flag": "expected Literal[True], got int 1",
        "n": "expected int | str, got float 1.5",
        "maybe": 'expected list[int] | None, got list [1, "2"]',
    }


def test_string_annotations_from_future_import(load: Loader) -> None:
    task = load(
        """
        from __future__ import annotations
        from typing import Literal
        def f(a: int | None, b: list[str], c: Literal["x"] = "x") -> None: ...
        """
    )
    assert [p.type for p in task.params] == ["int | None", "list[str]", "Literal['x']"]
    assert rejects(task, {"a": "1", "b": [1]}) == {
        "a": 'expected int | None, got str "1"',
        "b": "b[0]: expected str, got int 1",
    }


def test_task_without_parameters(load: Loader) -> None:
    task = load("def f() -> None: ...\n")
    assert task.validate({}) == {}
    assert rejects(task, {"x": 1}) == {"x": "unexpected argument; this task takes: no arguments"}


# --- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize("function", ["nocolon", ":f", "mod:", "a:b:c"])
def test_malformed_function_string(task_dir: Path, function: str) -> None:
    with pytest.raises(ConfigError, match=r"package\.module:function") as exc:
        Registry.load({"t": TaskSettings(name="t", function=function)}, [task_dir])
    assert exc.value.details["task"] == "t"
    assert exc.value.details["function"] == function


def test_module_not_found_names_task_function_and_paths(task_dir: Path) -> None:
    function = f"{PREFIX}missing.sub:f"
    with pytest.raises(ConfigError) as exc:
        Registry.load({"t": TaskSettings(name="t", function=function)}, [task_dir])
    message = exc.value.message
    assert "'t'" in message
    assert repr(function) in message
    assert "not found" in message
    assert str(task_dir.absolute()) in message


def test_missing_dependency_of_the_module(load: Loader) -> None:
    with pytest.raises(ConfigError, match="no_such_dependency_xyz"):
        load("import no_such_dependency_xyz\ndef f() -> None: ...\n")


def test_module_that_fails_on_import(load: Loader) -> None:
    with pytest.raises(ConfigError, match="ZeroDivisionError"):
        load("1 / 0\n")


@pytest.mark.parametrize(
    ("source", "attr", "reason"),
    [
        ("def f() -> None: ...\n", "g", "no attribute 'g'"),
        ("class C: ...\n", "C.m", "no attribute 'm'"),
        ("f = 3\n", "f", "not a callable"),
        ("class C:\n    def m(self) -> None: ...\n", "C.m", "instance method"),
        ("def f(*args: int) -> None: ...\n", "f", r"\*args is not supported"),
        ("def f(**kw: int) -> None: ...\n", "f", r"\*\*kw is not supported"),
        ("def f(a: int, /) -> None: ...\n", "f", "positional-only parameter 'a'"),
        ("def f(a: 'Nope') -> None: ...\n", "f", "cannot resolve its type hints"),
    ],
)
def test_unusable_functions(load: Loader, source: str, attr: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as exc:
        load(source, attr)
    assert exc.value.message.startswith("task 't': cannot use function ")
    assert exc.value.details["task"] == "t"


@pytest.mark.parametrize(
    "annotation",
    [
        "datetime.datetime",
        "Custom",
        "list[Custom]",
        "dict[int, str]",
        "tuple[int, str]",
        "Literal[1.5]",
        "int | datetime.date",
        "bytes",
    ],
)
def test_unsupported_annotations_name_the_parameter(load: Loader, annotation: str) -> None:
    source = f"""
        import datetime
        from typing import Literal
        class Custom: ...
        def f(ok: int, when: {annotation}) -> None: ...
    """
    with pytest.raises(ConfigError, match="parameter 'when' has an unsupported annotation") as exc:
        load(source)
    assert exc.value.details["parameter"] == "when"


@pytest.mark.parametrize("default", ["object()", "{1, 2}", "float('nan')", "b'x'"])
def test_defaults_must_be_json(load: Loader, default: str) -> None:
    with pytest.raises(ConfigError, match=r"default of parameter 'x'.*not JSON-serialisable"):
        load(f"def f(x={default}) -> None: ...\n")
