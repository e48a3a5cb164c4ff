"""The task registry: which functions may run as jobs, and what arguments they accept.

``Registry.load`` imports each configured ``"package.module:attr.path"``, reads its signature
and type hints, and derives a strict JSON validator from them; the API validates a job's
arguments with ``Task.validate`` before anything is stored.  Nothing here runs a task.

Supported annotations (anything else is a ``ConfigError`` at load time): ``str``, ``int``,
``float``, ``bool``, ``None``, ``list``/``list[T]``, ``tuple``/``tuple[T, ...]`` (JSON arrays),
``dict``/``dict[str, T]``, unions and ``Optional``, ``Literal`` of str/int/bool, and ``Any``
or no annotation (any JSON value).  JSON types are strict: ``"3"`` is not an int, ``true`` is
not an int, and a float must be finite.

A command task (``command = [...]`` instead of ``function``) takes the typed ``params`` of
its config table, all required; ``Task.argv`` fills each ``{placeholder}`` with one value,
so a value is always exactly one argument (no shell, no splitting).  A str value may not
start with "-" unless the param is in ``allow_leading_dash`` (it would read as an option).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from jobserver.config import TaskSettings
from jobserver.errors import ConfigError, UnknownTask, ValidationError

_EMPTY = inspect.Parameter.empty  # the "no default" / "no annotation" sentinel
_SCALARS = (str, int, float, bool)
_SUPPORTED = (
    "str, int, float, bool, None, list[T], tuple[T, ...], dict[str, T], "
    "unions (T | None), Literal[...] of str/int/bool, Any"
)


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # display name of the annotation: "str", "list[int]", "int | None", "any"
    required: bool
    default: Any  # JSON-able default; None when required
    annotation: Any = field(default=Any, repr=False, compare=False)  # what validate() checks


@dataclass(frozen=True)
class Task:
    name: str
    settings: TaskSettings
    params: tuple[Param, ...]

    def validate(self, args: object) -> dict[str, Any]:
        """Return a copy of ``args`` if they fit the signature; else raise ValidationError
        listing every problem, one entry per field.  Defaults are not filled in."""
        if not isinstance(args, dict):
            detail = {"field": "args", "message": f"expected a JSON object, got {_show(args)}"}
            raise ValidationError("args must be a JSON object", [detail])
        details: list[dict[str, str]] = []
        for param in self.params:
            if param.name not in args:
                if param.required:
                    details.append({"field": param.name, "message": "field required"})
                continue
            problem = _mismatch(args[param.name], param.annotation, "")
            if problem is not None:
                where, message = problem
                text = f"{param.name}{where}: {message}" if where else message
                details.append({"field": param.name, "message": text})
        known = {param.name for param in self.params}
        takes = ", ".join(p.name for p in self.params) or "no arguments"
        for key in args:
            if key not in known:
                message = f"unexpected argument; this task takes: {takes}"
                details.append({"field": str(key), "message": message})
        if self.settings.command is not None:
            details += self._command_problems(args)
        if details:
            raise ValidationError(f"invalid arguments for task {self.name!r}", details)
        return dict(args)

    def _command_problems(self, args: dict[str, Any]) -> list[dict[str, str]]:
        problems = []
        for name, value in args.items():
            if not isinstance(value, str):
                continue
            if "\x00" in value:
                problems.append({"field": name, "message": "a NUL character cannot be passed"})
            elif value.startswith("-") and name not in self.settings.allow_leading_dash:
                problems.append(
                    {
                        "field": name,
                        "message": "a value starting with '-' would read as an option; "
                        "add this param to allow_leading_dash if the program expects it",
                    }
                )
        return problems

    def argv(self, args: Mapping[str, Any]) -> tuple[str, ...]:
        """A command task's arguments: each placeholder replaced by its value's text; a
        value never splits into, or merges with, another argument."""
        assert self.settings.command is not None

        missing = [p.name for p in self.params if p.name not in args]
        if missing:  # stored before the config changed: refuse rather than pass "{x}"
            raise ValueError(f"task {self.name!r} has no value for {', '.join(missing)}")

        def text(value: Any) -> str:
            if isinstance(value, bool):
                return "true" if value else "false"
            return str(value)

        return tuple(
            _PLACEHOLDER.sub(lambda match: text(args[match.group(1)]), part)
            for part in self.settings.command
        )

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": self.name,
            "kind": "function" if s.command is None else "command",
            "function": s.function or None,
            "command": None if s.command is None else list(s.command),
            "params": [
                {"name": p.name, "type": p.type, "required": p.required, "default": p.default}
                for p in self.params
            ],
            "resources": {"cpus": s.cpus, "memory": s.memory},
            "max_retries": s.max_retries,
            "timeout": s.timeout,
            "route": s.route,
            "retry_on_timeout": s.retry_on_timeout,
            "retention": s.retention,
        }


class Registry:
    def __init__(self, tasks: Mapping[str, Task]) -> None:
        self._tasks = dict(tasks)

    @classmethod
    def load(
        cls,
        tasks: Mapping[str, TaskSettings],
        task_paths: Sequence[Path],
        *,
        describe: Describe | None = None,
    ) -> Registry:
        """Import every task's function (task_paths first on sys.path) and read its signature.

        A task with its own ``python`` is not imported here: ``describe(python, function)``
        (the runner's, which asks that interpreter) gives its parameters instead."""
        # Reversed, so that the first configured path ends up first on sys.path.
        for path in reversed(task_paths):
            entry = str(Path(path).absolute())
            if entry not in sys.path:
                sys.path.insert(0, entry)
        loaded = {
            name: _load_foreign_task(name, settings, describe)
            if settings.python is not None
            else _load_task(name, settings, task_paths)
            for name, settings in tasks.items()
        }
        routes: dict[str, str] = {}
        for task in loaded.values():
            route = task.settings.route
            if route is not None:
                if route in routes:
                    raise ConfigError(
                        f"tasks {routes[route]!r} and {task.name!r} both use route {route!r};"
                        " give each task its own route",
                        {"task": task.name, "route": route, "other": routes[route]},
                    )
                routes[route] = task.name
        return cls(loaded)

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            known = self.names()
            raise UnknownTask(f"unknown task {name!r}", {"task": name, "known": known}) from None

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def by_route(self) -> dict[str, Task]:
        return {t.settings.route: t for t in self._tasks.values() if t.settings.route is not None}

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def update_settings(self, settings: Mapping[str, TaskSettings]) -> None:
        """New resource settings for known tasks (a runtime change: PATCH, SIGHUP).  The
        function and route are not replaced: they shaped the imports and HTTP routes."""
        for name, new in settings.items():
            task = self._tasks.get(name)
            if task is not None:
                kept = replace(new, function=task.settings.function, route=task.settings.route)
                self._tasks[name] = replace(task, settings=kept)


# --- loading -------------------------------------------------------------------------------


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_COMMAND_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "bool": bool}


def _load_task(name: str, settings: TaskSettings, task_paths: Sequence[Path]) -> Task:
    if settings.command is not None:
        params = tuple(
            Param(param, kind, True, None, annotation=_COMMAND_TYPES[kind])
            for param, kind in settings.params.items()
        )
        return Task(name, settings, params)
    function = settings.function

    def fail(reason: str, **extra: Any) -> ConfigError:
        message = f"task {name!r}: cannot use function {function!r}: {reason}"
        return ConfigError(message, {"task": name, "function": function, **extra})

    module_name, sep, attr_path = function.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise fail("write it as 'package.module:function' (or 'package.module:Class.method')")
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            searched = [str(Path(p).absolute()) for p in task_paths]
            raise fail(
                f"module {module_name!r} not found (searched task_paths {searched}, then the "
                "installed packages); check the module name and the task_paths setting",
                task_paths=searched,
            ) from exc
        raise fail(f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:  # the module's own code failed at import time
        raise fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc

    for attr in attr_path.split("."):
        owner = target
        try:
            target = getattr(owner, attr)
        except AttributeError:
            what = f"{type(owner).__name__} {_qualname(owner)}"
            raise fail(f"{what} has no attribute {attr!r}") from None
        # Class.method on a plain method would need an instance the child never has.
        if inspect.isclass(owner) and inspect.isfunction(inspect.getattr_static(owner, attr, None)):
            raise fail("it is an instance method; use a staticmethod, classmethod or function")
    if not callable(target):
        raise fail(f"it is a {type(target).__name__}, not a callable")

    try:
        # eval_str resolves string annotations (``from __future__ import annotations``) like
        # typing.get_type_hints, and also works for classes, partials and callable objects.
        signature = inspect.signature(target, eval_str=True)
    except (ValueError, TypeError) as exc:
        raise fail(f"cannot read its signature: {exc}") from exc
    except Exception as exc:  # NameError etc. from evaluating string annotations
        raise fail(f"cannot resolve its type hints: {type(exc).__name__}: {exc}") from exc
    return Task(name, settings, tuple(_param(p, fail) for p in signature.parameters.values()))


# (python, function) -> {"ok": true, "params": [...]} as ``child.py --describe`` prints it.
Describe = Callable[[Path, str], Mapping[str, Any]]

# What annotation text from another interpreter may name: the JSON types and typing's forms.
_ANNOTATION_NAMES: dict[str, Any] = {
    "__builtins__": {},
    "None": None,
    "NoneType": NoneType,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "typing": typing,
    **{name: getattr(typing, name) for name in typing.__all__},
}


def _load_foreign_task(name: str, settings: TaskSettings, describe: Describe | None) -> Task:
    """A task run under its own interpreter: its signature comes from that interpreter."""
    function, python = settings.function, settings.python

    def fail(reason: str, **extra: Any) -> ConfigError:
        message = f"task {name!r}: cannot use function {function!r} with python {python}: {reason}"
        return ConfigError(message, {"task": name, "function": function, **extra})

    if describe is None or python is None:
        raise fail("this registry cannot ask another interpreter")
    document = describe(python, function)
    if not document.get("ok"):
        error = document.get("error") or {}
        raise fail(f"{error.get('type', 'Error')}: {error.get('message', 'unknown error')}")
    params = []
    for entry in document.get("params", []):
        text = entry.get("annotation")
        try:
            annotation = _EMPTY if text is None else eval(text, _ANNOTATION_NAMES)
        except Exception:
            raise fail(
                f"parameter {entry['name']!r} has an unsupported annotation {text}; "
                f"supported: {_SUPPORTED}",
                parameter=entry["name"],
            ) from None
        params.append(
            inspect.Parameter(
                entry["name"],
                getattr(inspect.Parameter, entry["kind"]),  # "KEYWORD_ONLY" etc.
                default=entry.get("default", _EMPTY),
                annotation=annotation,
            )
        )
    return Task(name, settings, tuple(_param(p, fail) for p in params))


def _param(p: inspect.Parameter, fail: Callable[..., ConfigError]) -> Param:
    if p.kind is p.VAR_POSITIONAL or p.kind is p.VAR_KEYWORD:
        star = "*" if p.kind is p.VAR_POSITIONAL else "**"
        raise fail(f"{star}{p.name} is not supported; jobs take named JSON arguments only")
    if p.kind is p.POSITIONAL_ONLY:
        raise fail(f"positional-only parameter {p.name!r} is not supported; remove the '/'")
    try:
        type_name = _type_name(p.annotation)
    except TypeError as exc:
        raise fail(
            f"parameter {p.name!r} has an unsupported annotation "
            f"{inspect.formatannotation(p.annotation)} ({exc}); supported: {_SUPPORTED}",
            parameter=p.name,
        ) from None
    required = p.default is _EMPTY
    if not required:
        try:
            json.dumps(p.default, allow_nan=False)
        except (TypeError, ValueError):
            raise fail(
                f"the default of parameter {p.name!r} ({p.default!r}) is not JSON-serialisable",
                parameter=p.name,
            ) from None
    default = None if required else p.default
    return Param(p.name, type_name, required, default, annotation=p.annotation)


def _qualname(obj: object) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj)))


# --- annotations -----------------------------------------------------------------------------


def _parts(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """(origin, args), with bare ``list``/``dict``/``tuple`` treated like ``list[Any]`` etc."""
    if tp in (list, dict, tuple):
        return tp, ()
    return get_origin(tp), get_args(tp)


def _type_name(tp: Any) -> str:
    """Display name of a supported annotation; TypeError saying why for anything else."""
    if tp is Any or tp is _EMPTY:
        return "any"
    if tp is None or tp is NoneType:
        return "None"
    if tp in _SCALARS:
        return str(tp.__name__)
    origin, args = _parts(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is tuple:
        if not args:
            return "tuple"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        raise TypeError("only tuple[T, ...] is supported")
    if origin is dict:
        if not args:
            return "dict"
        if args[0] is not str:
            raise TypeError("JSON object keys are strings: use dict[str, T]")
        return f"dict[str, {_type_name(args[1])}]"
    if origin is Union or origin is UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        if not all(type(a) in (str, int, bool) for a in args):
            raise TypeError("Literal values must be str, int or bool")
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    raise TypeError("not a JSON type")


def _mismatch(value: object, tp: Any, where: str) -> tuple[str, str] | None:
    """None if ``value`` fits ``tp``; else (path inside the value, what is wrong)."""
    origin, args = _parts(tp)
    if origin is Annotated:
        return _mismatch(value, args[0], where)
    if tp is Any or tp is _EMPTY:
        return None
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        return where, f"expected a finite float, got {_show(value)}"
    if origin is list or origin is tuple:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if args and (problem := _mismatch(item, args[0], f"{where}[{i}]")):
                    return problem
            return None
    elif origin is dict:
        if isinstance(value, dict):
            for key, item in value.items():
                if args and (problem := _mismatch(item, args[1], f"{where}.{key}")):
                    return problem
            return None
    elif _fits(value, tp, origin, args):
        return None
    return where, f"expected {_type_name(tp)}, got {_show(value)}"


def _fits(value: object, tp: Any, origin: Any, args: tuple[Any, ...]) -> bool:
    if tp is None or tp is NoneType:
        return value is None
    if tp is bool or tp is str:
        return isinstance(value, tp)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is Union or origin is UnionType:
        return any(_mismatch(value, a, "") is None for a in args)
    return False


def _show(value: object, limit: int = 40) -> str:
    """A short description of a value for error messages: ``str "abc"``, ``None``."""
    if value is None:
        return "None"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


# --- JSON Schema (for the OpenAPI description) ------------------------------------------------


def json_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema (OpenAPI 3.0 dialect) that ``validate`` enforces for one annotation."""
    origin, args = _parts(tp)
    if origin is Annotated:
        return json_schema(args[0])
    if tp is Any or tp is _EMPTY:
        return {}
    if tp is None or tp is NoneType:
        return {"nullable": True, "enum": [None]}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if origin is list or origin is tuple:
        return {"type": "array", "items": json_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        if args:
            return {"type": "object", "additionalProperties": json_schema(args[1])}
        return {"type": "object"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is Union or origin is UnionType:
        options = [a for a in args if a is not None and a is not NoneType]
        schema: dict[str, Any] = (
            json_schema(options[0])
            if len(options) == 1
            else {"anyOf": [json_schema(a) for a in options]}
        )
        if len(options) < len(args):
            schema = {**schema, "nullable": True}
        return schema
    return {}


def args_schema(task: Task) -> dict[str, Any]:
    """The JSON Schema of a task's ``args`` object."""
    return {
        "type": "object",
        "properties": {p.name: json_schema(p.annotation) for p in task.params},
        "required": [p.name for p in task.params if p.required],
        "additionalProperties": False,
    }
