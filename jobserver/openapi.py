"""The machine-readable description of the HTTP API: ``GET /openapi.json`` (OpenAPI 3.0).

``api.routes`` is the one table of routes (method, path, endpoint); ``OPERATIONS`` says,
per endpoint, the scope a token needs and what goes in and comes out.  ``described`` joins
the two and refuses a route without an operation, or an operation without a route.  The
access middleware reads its rules from the result (so a route cannot be described with
one scope and guarded with another).  To add a route: add it to ``api.routes`` and its
``Operation`` here.

Tasks with a ``route`` get an operation each, built from their signature
(``tutorial_operations``), so the document describes the arguments each one takes; the
body of ``POST /api/v1/jobs`` is one schema per task (``Submission``, discriminated by
``task``).  Links lead from an answer that carries a job id to the operations on that job,
so a client generator (or a fuzzer's stateful phase) can follow them.

``document`` describes security as the server is configured: a server that serves
anonymously (no tokens, on loopback or with ``allow_anonymous``) declares no security
scheme and no 401/403; one with tokens declares bearer security on every guarded
operation.  The server serves the document that matches its state at the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from starlette.routing import BaseRoute, Route

from jobserver import api
from jobserver.jobs import MAX_PRIORITY, MAX_TIMEOUT, JobState
from jobserver.store import MAX_PAGE
from jobserver.tasks import Registry, args_schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_STRING = {"type": "string"}
# What the API accepts as a job id in a body or a query (api._looks_like_job_id).
JOB_ID_PATTERN = "^[0-9A-Za-z]{26}$"
_TIME = {"type": "string", "format": "date-time", "nullable": True}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": {"type": "string", "description": "stable, machine-readable"},
                    "message": {"type": "string", "description": "what went wrong, what to do"},
                    "details": {"nullable": True, "description": "fields, limits, ids"},
                },
            }
        },
    },
    "JobError": {
        "type": "object",
        "nullable": True,
        "required": ["type", "message", "traceback"],
        "properties": {
            "type": _STRING,
            "message": _STRING,
            "traceback": _nullable(_STRING),
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "id",
            "task",
            "args",
            "state",
            "priority",
            "created_at",
            "attempts",
            "cancel_requested",
        ],
        "properties": {
            "id": {"type": "string", "description": "a ULID: sorts by creation time"},
            "task": _STRING,
            "args": {"type": "object"},
            "state": {"type": "string", "enum": [state.value for state in JobState]},
            "priority": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME,
            "finished_at": _TIME,
            "attempts": {"type": "integer", "minimum": 0},
            "max_retries": {"type": "integer", "minimum": 0},
            "result": {"nullable": True, "description": "the task's return value (JSON)"},
            "error": {"$ref": "#/components/schemas/JobError"},
            "reason": _nullable(_STRING),
            "waiting_reason": _nullable(_STRING),
            "run_after": _TIME,
            "cancel_requested": {"type": "boolean"},
            "exit_code": _nullable({"type": "integer"}),
            "peak_rss": _nullable({"type": "integer"}),
            "cpu_seconds": _nullable({"type": "number"}),
            "owner": _nullable({"type": "string", "description": "the submitting token"}),
            "schedule": {
                "type": "object",
                "nullable": True,
                "description": "the [schedules.NAME] that fired the job, and the slot",
                "properties": {"name": _STRING, "slot": _TIME},
            },
            "timeout": _nullable({"type": "number", "description": "this job's own timeout"}),
            "depends_on": {"type": "array", "items": _STRING},
            "progress": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "fraction": _nullable({"type": "number"}),
                    "message": _STRING,
                    "updated_at": {"type": "string", "format": "date-time"},
                },
            },
            "artifacts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "size", "sha256"],
                    "properties": {
                        "name": _STRING,
                        "size": {"type": "integer"},
                        "sha256": _STRING,
                    },
                },
            },
            "history": {
                "type": "array",
                "description": "every attempt: start, end, outcome, error, the node that ran it",
                "items": {"type": "object"},
            },
        },
    },
    "JobEnd": {
        "type": "object",
        "maxProperties": 0,
        "description": "the data of the last event: the job is finished",
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "next_cursor"],
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": _nullable(_STRING),
        },
    },
    "TaskStatus": {
        "type": "object",
        "required": ["task_id", "status"],
        "properties": {
            "task_id": _STRING,
            "status": {
                "type": "string",
                "enum": ["PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED"],
            },
            "result": {"nullable": True},
            "error": _nullable(_STRING),
            "waiting_reason": _nullable(_STRING),
            "info": {"type": "object", "description": "progress of a STARTED job"},
        },
    },
    "Accepted": {
        "type": "object",
        "required": ["message", "task_id"],
        "properties": {"message": _STRING, "task_id": _STRING},
    },
    "TaskList": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": {"type": "object"}}},
    },
    "System": {
        "type": "object",
        "required": ["nodes"],
        "properties": {
            "nodes": {
                "type": "array",
                "description": "every node sharing the database, by name then start (on "
                "PostgreSQL each start of a node is an incarnation of its own; dead ones "
                "stay listed for a day); on SQLite the one server, as one live node",
                "items": {"$ref": "#/components/schemas/Node"},
            }
        },
    },
    "Node": {
        "type": "object",
        "required": [
            "name",
            "incarnation",
            "alive",
            "leader",
            "started_at",
            "last_heartbeat",
            "heartbeat_age",
            "dead_at",
            "url",
            "capacity",
            "free",
            "max_jobs",
            "running",
            "cordoned",
        ],
        "properties": {
            "name": _STRING,
            "incarnation": {**_STRING, "description": "this start of the node"},
            "alive": {
                "type": "boolean",
                "description": "not declared dead, and heard from within node_timeout "
                "(the database's clock)",
            },
            "leader": {"type": "boolean", "description": "runs rescue, pruning and cron"},
            "started_at": _nullable({"type": "string", "format": "date-time"}),
            "last_heartbeat": _nullable({"type": "string", "format": "date-time"}),
            "heartbeat_age": _nullable({"type": "number", "description": "seconds"}),
            "dead_at": _nullable({"type": "string", "format": "date-time"}),
            "url": _nullable(_STRING),
            "capacity": {**_nullable({"type": "object"}), "description": "cpus, memory"},
            "free": {**_nullable({"type": "object"}), "description": "cpus, memory"},
            "max_jobs": _nullable({"type": "integer"}),
            "running": {"type": "integer", "description": "jobs its attempts run, as stored"},
            "cordoned": {"type": "boolean"},
        },
    },
    "SystemHistory": {
        "type": "object",
        "required": ["interval", "window", "samples"],
        "properties": {
            "interval": {"type": "number", "description": "seconds between two samples"},
            "window": {"type": "number", "description": "seconds of samples kept"},
            "samples": {
                "type": "array",
                "description": "oldest first; one more whenever admission stops or resumes",
                "items": {
                    "type": "object",
                    "required": ["at", "cpu", "memory", "running", "overload"],
                    "properties": {
                        "at": {"type": "string", "format": "date-time"},
                        "cpu": {"$ref": "#/components/schemas/Usage"},
                        "memory": {"$ref": "#/components/schemas/Usage"},
                        "running": {"type": "integer"},
                        "overload": {
                            **_nullable(_STRING),
                            "description": "why admission was stopped (memory floor, PSI)",
                        },
                    },
                },
            },
        },
    },
    "Usage": {
        "type": "object",
        "description": "one resource, in CPUs or bytes",
        "required": ["capacity", "used", "claimed", "reserved", "free"],
        "properties": {
            "capacity": {"type": "number", "description": "what jobs may use (caps applied)"},
            "used": {"type": "number", "description": "measured use of the running jobs"},
            "claimed": {"type": "number", "description": "requests of the running jobs"},
            "reserved": {"type": "number", "description": "reserve_cpus / reserve_memory"},
            "free": {"type": "number", "description": "free for a new job (may be negative)"},
        },
    },
    "Timeline": {
        "type": "object",
        "required": ["now", "attempts"],
        "properties": {
            "now": {"type": "string", "format": "date-time"},
            "attempts": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "job_id",
                        "task",
                        "attempt",
                        "started_at",
                        "finished_at",
                        "outcome",
                        "state",
                        "node",
                    ],
                    "properties": {
                        "job_id": _STRING,
                        "task": _STRING,
                        "attempt": {"type": "integer", "minimum": 1},
                        "started_at": {"type": "string", "format": "date-time"},
                        "finished_at": _TIME,
                        "outcome": {
                            **_nullable(_STRING),
                            "description": "how the attempt ended; null while it runs",
                        },
                        "state": {"type": "string", "enum": [state.value for state in JobState]},
                        "node": {**_nullable(_STRING), "description": "the node that ran it"},
                    },
                },
            },
        },
    },
    "TaskSeries": {
        "type": "object",
        "required": ["since", "now", "bucket", "tasks"],
        "properties": {
            "since": {"type": "string", "format": "date-time"},
            "now": {"type": "string", "format": "date-time"},
            "bucket": {"type": "integer", "description": "seconds per bucket"},
            "tasks": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["task", "buckets"],
                    "properties": {
                        "task": _STRING,
                        "buckets": {
                            "type": "array",
                            "description": "buckets where some job finished, oldest first",
                            "items": {
                                "type": "object",
                                "required": [
                                    "start",
                                    "finished",
                                    "succeeded",
                                    "failed",
                                    "cancelled",
                                    "duration_p50",
                                    "duration_p95",
                                ],
                                "properties": {
                                    "start": {"type": "string", "format": "date-time"},
                                    "finished": {"type": "integer", "minimum": 0},
                                    "succeeded": {"type": "integer", "minimum": 0},
                                    "failed": {"type": "integer", "minimum": 0},
                                    "cancelled": {"type": "integer", "minimum": 0},
                                    "duration_p50": {"type": "number", "nullable": True},
                                    "duration_p95": {"type": "number", "nullable": True},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "Stats": {
        "type": "object",
        "required": ["tasks"],
        "properties": {"tasks": {"type": "array", "items": {"type": "object"}}},
    },
    "SystemChange": {
        "type": "object",
        "required": ["changed", "system"],
        "properties": {
            "changed": {"type": "array", "items": _STRING},
            "system": {"$ref": "#/components/schemas/System"},
        },
    },
    "BulkResult": {
        "type": "object",
        "required": ["count", "ids", "truncated", "cascaded"],
        "properties": {
            "count": {"type": "integer", "description": "jobs changed"},
            "ids": {"type": "array", "items": _STRING, "description": "the first 1000"},
            "truncated": {"type": "boolean", "description": "more changed than ids lists"},
            "cascaded": {"type": "integer", "description": "dependents cancelled with them"},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}, "version": _STRING},
    },
}

_ERROR_TEXT = {
    400: "malformed JSON",
    401: "no token, or a token this server does not know",
    403: "the token lacks the scope this operation needs",
    404: "no such job (or it belongs to another client)",
    409: "the job's state does not allow this (or an Idempotency-Key reused with another body)",
    410: "the job was pruned (past its retention); details.pruned_at says when",
    413: "the body or the args are larger than a configured limit (named in details)",
    415: "the body is not application/json",
    422: "invalid content, or a JSON limit exceeded (named in details)",
    429: "the token's rate limit is exceeded (see Retry-After)",
    503: "the database cannot be written, the queue is full, or the server is shutting down "
    "(see Retry-After)",
}
_BODY_ERRORS = (400, 413, 415, 422)
# Responses that are not JSON: their media type stands where a schema name would.
TEXT = "text/plain"
# An artifact is served as the type its name suggests (application/octet-stream if none).
ANY_FILE = "*/*"
HTML = "text/html"
EVENTS = "text/event-stream"


@dataclass(frozen=True)
class Operation:
    """What one endpoint does: ``scope`` is what a token needs (None: open to anyone)."""

    scope: str | None
    summary: str
    responses: Mapping[int, str | None]  # status -> schema name in SCHEMAS (None: error)
    body: Mapping[str, Any] | None = None  # JSON Schema of the request body
    parameters: Sequence[Mapping[str, Any]] = ()
    description: str = ""
    tags: Sequence[str] = field(default_factory=lambda: ("jobs",))
    # status -> links from that answer to other operations
    links: Mapping[int, Mapping[str, Link]] = field(default_factory=dict)


class PathOperation(NamedTuple):
    """An operation where it is served."""

    method: str
    path: str
    operation: Operation


def _submit_options(max_retries_limit: int) -> dict[str, Any]:
    """The submit body's fields beside ``task`` and ``args``, bounded as the API checks them
    (``api.submit_options``)."""
    return {
        "priority": {
            "type": "integer",
            "minimum": -MAX_PRIORITY,
            "maximum": MAX_PRIORITY,
        },
        "max_retries": {
            "type": "integer",
            "minimum": 0,
            "maximum": max_retries_limit,
            "description": "override the task's max_retries, up to the server's max_retries_limit",
        },
        "timeout": {
            "type": "number",
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": MAX_TIMEOUT,
            "description": "seconds",
        },
        "run_at": {
            "type": "string",
            "format": "date-time",
            "description": "start no earlier than this (with a UTC offset), at most 366 days "
            "ahead; not with delay",
        },
        "delay": {
            "type": "number",
            "minimum": 0,
            "maximum": api.MAX_DELAY,
            "description": "seconds; not with run_at",
        },
        "depends_on": {
            "type": "array",
            "items": {"type": "string", "pattern": JOB_ID_PATTERN},
            "maxItems": api.MAX_DEPENDENCIES,
            "uniqueItems": True,
            "description": "ids of jobs of this client that must succeed first (422 names "
            "an id that is not one)",
        },
    }


def submission_schemas(registry: Registry, max_retries_limit: int) -> dict[str, Any]:
    """``Submission``: one schema per task (``Submission.NAME``: its name, its arguments,
    the shared options), told apart by ``task``; ``run_at`` and ``delay`` exclude each
    other."""
    options = _submit_options(max_retries_limit)
    schemas: dict[str, Any] = {}
    for task in registry:
        arguments = args_schema(task)
        schemas[f"Submission.{task.name}"] = {
            "type": "object",
            # Without args the task gets none: required when its signature needs some.
            "required": ["task", "args"] if arguments["required"] else ["task"],
            "additionalProperties": False,
            "properties": {
                "task": {"type": "string", "enum": [task.name]},
                "args": {**arguments, "description": "the task's named arguments"},
                **options,
            },
            "not": {"required": ["run_at", "delay"]},
        }
    refs = {name.removeprefix("Submission."): f"#/components/schemas/{name}" for name in schemas}
    if not refs:  # no task: no submission is valid
        return {"Submission": {"not": {}, "description": "this server has no tasks"}}
    schemas["Submission"] = {
        "oneOf": [{"$ref": ref} for ref in refs.values()],
        "discriminator": {"propertyName": "task", "mapping": refs},
        "description": "a task name from GET /api/v1/tasks, its args, and options",
    }
    return schemas


# Values as config.toml takes them (config.parse_size, config.parse_duration).
_SIZE = {
    "oneOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*([kmgtKMGT][iI]?[bB]|[bB])?\s*$"},
    ],
    "description": 'bytes, or a size like "512MiB"',
}
_DURATION = {
    "oneOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^(\s*\d+(\.\d+)?\s*(ms|s|m|h|d))+\s*$"},
    ],
    "description": 'seconds, or a duration like "30s", "5m", "1h30m"',
}


def _percent(lowest: float, highest: float) -> dict[str, Any]:
    return {"type": "number", "minimum": lowest, "maximum": highest}


# The [scheduler] keys PATCH /api/v1/system takes (config._scheduler, config._scheduling);
# null resets the keys config.toml may leave out.  Whether a change is accepted may also
# depend on the machine and on the other keys (a memory floor below its memory): a 422
# says which key and why.
_SCHEDULER_CHANGES: dict[str, Any] = {
    "poll_interval": _DURATION,
    "max_jobs": {"type": "integer", "minimum": 1},
    "max_cpus": _nullable({"type": "number", "exclusiveMinimum": True, "minimum": 0}),
    "max_memory": _nullable(_SIZE),
    "reserve_cpus": {"type": "number", "minimum": 0},
    "reserve_memory": _SIZE,
    "kill_grace": _DURATION,
    "max_rescues": {"type": "integer", "minimum": 0},
    "default_memory": _SIZE,
    "memory_floor": _SIZE,
    "memory_pressure_limit": _nullable(_percent(0, 100)),
    "cpu_pressure_limit": _nullable(_percent(0, 100)),
    "hysteresis": _percent(0, 1),
    "starvation_after": _nullable(_DURATION),
    "pressure_action": {"type": "string", "enum": ["requeue", "pause", "none"]},
    "max_pressure_requeues": {"type": "integer", "minimum": 0},
    "learn_percentile": _percent(1, 100),
    "learn_margin": _percent(1, 10),
    "learn_window": {"type": "integer", "minimum": 1, "maximum": 10_000},
    "job_cgroups": {"type": "boolean"},
    "gpu_may_appear": {"type": "boolean"},
}
# A task's keys that change at run time (config.RUNTIME_TASK_KEYS, config.apply_changes).
_TASK_CHANGES: dict[str, Any] = {
    "cpus": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
    "memory": _nullable(_SIZE),
    "memory_limit": _nullable(_SIZE),
    "max_concurrency": _nullable({"type": "integer", "minimum": 1}),
    "exclusive": {"type": "boolean"},
    "timeout": _nullable(_DURATION),
    "max_retries": {"type": "integer", "minimum": 0},
    "gpus": {"type": "integer", "minimum": 0, "maximum": 64},
    "gpu_memory": _nullable(_SIZE),
}


def system_change_schemas(registry: Registry) -> dict[str, Any]:
    """``SystemChanges``: the body of PATCH /api/v1/system, the [scheduler] keys and the
    run-time keys of this server's tasks."""
    task = {"type": "object", "additionalProperties": False, "properties": _TASK_CHANGES}
    return {
        "SystemChanges": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "scheduler": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": _SCHEDULER_CHANGES,
                    "description": "[scheduler] keys, written as in config.toml",
                },
                "tasks": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {t.name: task for t in registry},
                    "description": "a task's name -> its keys that change at run time",
                },
            },
        }
    }


def _job_links(id_expression: str) -> dict[str, Link]:
    """Links from an answer that carries a job's id (at ``id_expression``) to the
    operations on that job."""
    on_job = {"job_id": id_expression}
    return {
        "GetJob": Link("GET", "/api/v1/jobs/{job_id}", on_job),
        "CancelJob": Link("POST", "/api/v1/jobs/{job_id}/cancel", on_job),
        "RetryJob": Link("POST", "/api/v1/jobs/{job_id}/retry", on_job),
        "JobLogs": Link("GET", "/api/v1/jobs/{job_id}/logs", on_job),
        "JobEvents": Link("GET", "/api/v1/jobs/{job_id}/events", on_job),
        "TaskStatus": Link("GET", "/api/v1/task-status/{task_id}", {"task_id": id_expression}),
    }


class Link(NamedTuple):
    """An OpenAPI link: the operation (method, path) and how its parameters are filled
    from the answer (runtime expressions like ``$response.body#/id``)."""

    method: str
    path: str
    parameters: Mapping[str, str]


_JOB_LINKS = _job_links("$response.body#/id")
_ARTIFACT_LINK = {
    "JobArtifact": Link(
        "GET",
        "/api/v1/jobs/{job_id}/artifacts/{name}",
        {"job_id": "$response.body#/id", "name": "$response.body#/artifacts/0/name"},
    )
}

_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "the same key with the same body returns the original job (200)",
    # 1 to 255 printable ASCII characters (api._idempotency_key); HTTP trims the ends'
    # spaces, so a key starts and ends with a visible one.
    "schema": {"type": "string", "pattern": "^[!-~]([ -~]{0,253}[!-~])?$"},
}

_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9A-Za-z]{1,64}$"},
}

Endpoint = Callable[..., Any]


def _integer_query(
    bounds: Mapping[str, tuple[int, int, int]], **descriptions: str
) -> tuple[dict[str, Any], ...]:
    """Query parameters from an endpoint's (default, lowest, highest) integer bounds."""
    return tuple(
        {
            "name": name,
            "in": "query",
            "description": descriptions[name],
            "schema": {"type": "integer", "minimum": low, "maximum": high, "default": default},
        }
        for name, (default, low, high) in bounds.items()
    )


def _bulk_filter(states: tuple[str, ...], task_names: Sequence[str] = ()) -> dict[str, Any]:
    """A bulk cancel or retry body: at least one criterion, or ``"all": true``."""
    state = {"type": "string", "enum": list(states)}
    task = {**_STRING, "description": "a registered task's name"}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "task": {**task, "enum": list(task_names)} if task_names else task,
            "state": {"oneOf": [state, {"type": "array", "items": state, "minItems": 1}]},
            "older_than": {
                "type": "number",
                "minimum": 0,
                "exclusiveMaximum": True,
                "maximum": 1e10,
                "description": "seconds since submit",
            },
            "before": {"type": "string", "format": "date-time", "description": "submitted before"},
            "all": {"type": "boolean", "description": "true: no criterion is needed"},
        },
        "anyOf": [
            *({"required": [criterion]} for criterion in ("task", "state", "older_than", "before")),
            {"required": ["all"], "properties": {"all": {"enum": [True]}}},
        ],
    }


# Every endpoint of api.routes, described; the document lists them in this order.


OPERATIONS: Mapping[Endpoint, Operation] = {
    api.healthz: Operation(
        None,
        "Liveness: the server answers and its database can be read",
        {200: "Health", 503: None},
        tags=("system",),
    ),
    api.readyz: Operation(
        None,
        "Readiness: as /healthz, but 503 (code draining) while the server shuts down",
        {200: "Health", 503: None},
        tags=("system",),
    ),
    api.openapi_json: Operation(
        None,
        "This document",
        {200: None},
        tags=("system",),
    ),
    api.submit_job: Operation(
        "submit",
        "Submit a job; 202 means it is stored durably",
        {200: "Job", 202: "Job", 409: None, **dict.fromkeys(_BODY_ERRORS)},
        body={"$ref": "#/components/schemas/Submission"},
        parameters=(_IDEMPOTENCY_KEY,),
        description="The job row is committed to the database before the answer is sent. "
        "200 (not 202) answers a repeated Idempotency-Key with the original job.",
        links={200: _JOB_LINKS, 202: _JOB_LINKS},
    ),
    api.list_jobs: Operation(
        "read",
        "List jobs, newest first (a client token sees only its own)",
        {200: "JobList", 422: None},
        parameters=(
            {
                "name": "state",
                "in": "query",
                "schema": {"type": "string", "enum": [state.value for state in JobState]},
            },
            {"name": "task", "in": "query", "schema": {"type": "string"}},
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            },
            {
                "name": "cursor",
                "in": "query",
                "description": "the next_cursor of the previous page (a job id); empty: "
                "the first page",
                "schema": {"type": "string", "pattern": "^([0-9A-Za-z]{26})?$"},
            },
        ),
    ),
    api.get_job: Operation(
        "read",
        "Read one job; with ?wait=N, answer as soon as it changes (long polling)",
        {200: "Job", 404: None, 410: None, 422: None},
        parameters=(
            _JOB_ID,
            {
                "name": "wait",
                "in": "query",
                "description": "seconds to wait for a change (state, progress) before answering",
                "schema": {"type": "number", "minimum": 0, "maximum": 60},
            },
            {
                "name": "If-None-Match",
                "in": "header",
                "description": "the ETag of the document the client has: wait for another",
                "schema": {"type": "string"},
            },
        ),
        description="Carries an ETag, and Retry-After while the job is not finished.",
        links={200: {**_JOB_LINKS, **_ARTIFACT_LINK}},
    ),
    api.job_events: Operation(
        "read",
        "The job as Server-Sent Events: the document now and at every change, then 'end'",
        {200: EVENTS, 404: None, 410: None},
        parameters=(_JOB_ID,),
        description="Each event 'job' carries the job's document (as GET /api/v1/jobs/{id} "
        "answers it) in its data, with the document's ETag as the event id; the last "
        "event, 'end', carries {}.",
    ),
    api.cancel_job: Operation(
        "cancel",
        "Cancel a job: at once if queued (200), by signalling its processes if running (202)",
        {200: "Job", 202: "Job", 404: None, 409: None, 410: None},
        parameters=(_JOB_ID,),
        links={200: _JOB_LINKS, 202: _JOB_LINKS},
    ),
    api.retry_job: Operation(
        "submit",
        "Run a failed or cancelled job again, as a new attempt",
        {202: "Job", 404: None, 409: None, 410: None},
        parameters=(_JOB_ID,),
        links={202: _JOB_LINKS},
    ),
    api.cancel_jobs: Operation(
        "cancel",
        "Cancel every queued or running job the filter selects (running ones are signalled)",
        {200: "BulkResult", **dict.fromkeys(_BODY_ERRORS)},
        body=_bulk_filter(("queued", "running")),
        description='Give at least one criterion, or "all": true; jobs submitted after '
        "the request are not touched.",
    ),
    api.retry_jobs: Operation(
        "submit",
        "Run again every failed or cancelled job the filter selects",
        {200: "BulkResult", **dict.fromkeys(_BODY_ERRORS)},
        body=_bulk_filter(("failed", "cancelled")),
        description="A job whose dependency stays failed or cancelled is left as it is.",
    ),
    api.job_logs: Operation(
        "read",
        "The job's stdout and stderr (text/plain); ?follow=1 streams until the job ends",
        {200: TEXT, 404: None, 410: None, 422: None},
        parameters=(
            _JOB_ID,
            {
                "name": "tail",
                "in": "query",
                "schema": {"type": "integer", "minimum": 0, "maximum": api.MAX_TAIL},
            },
            {
                "name": "follow",
                "in": "query",
                "schema": {"type": "string", "enum": ["0", "1", "false", "true"]},
            },
        ),
    ),
    api.job_artifact: Operation(
        "read",
        "A file the job left in $JOBSERVER_OUTPUT_DIR (listed in its artifacts)",
        {200: ANY_FILE, 404: None, 410: None},
        parameters=(
            _JOB_ID,
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        ),
    ),
    api.task_status: Operation(
        "read",
        "A job in the tutorial's (Celery's) terms",
        {200: "TaskStatus", 404: None, 410: None},
        parameters=({**_JOB_ID, "name": "task_id"},),
        tags=("tutorial",),
    ),
    api.stats: Operation(
        "read",
        "Per task: jobs by state, success rate, p50/p95 duration, peak memory",
        {200: "Stats"},
        tags=("system",),
    ),
    api.metrics_endpoint: Operation(
        "read",
        "Prometheus metrics (text exposition format), all named jobserver_*",
        {200: TEXT},
        tags=("system",),
    ),
    api.page: Operation(
        None,
        "The web page: machine, queue, running and finished jobs (it asks for a token "
        "when the server has some)",
        {200: HTML},
        tags=("system",),
    ),
    api.system_history: Operation(
        "admin",
        "The machine over the last hour: CPU and memory used, claimed and free",
        {200: "SystemHistory", 422: None},
        description="One sample every `interval` seconds, kept in memory for `window` "
        "seconds (a restart starts afresh), and one more whenever admission stops or "
        "resumes; a sample's `overload` says why admission was stopped.",
        tags=("system",),
    ),
    api.timeline: Operation(
        "read",
        "Recent attempts on a time axis: the newest jobs that started, and every running one",
        {200: "Timeline", 422: None},
        parameters=_integer_query(api.TIMELINE_QUERY, limit="how many of the newest started jobs"),
        description="A client token sees only its own jobs.",
    ),
    api.stats_history: Operation(
        "read",
        "Per task over time: jobs finished per bucket, and the p50/p95 duration",
        {200: "TaskSeries", 422: None},
        parameters=_integer_query(
            api.SERIES_QUERY,
            window="seconds back from now",
            bucket="seconds per bucket",
        ),
        description="Buckets start on whole multiples of `bucket` since the epoch; "
        "durations are start to finish of the succeeded jobs' last attempt.",
        tags=("system",),
    ),
    api.list_tasks: Operation(
        "read",
        "The registered tasks and the arguments each takes",
        {200: "TaskList"},
        tags=("system",),
    ),
    api.system: Operation(
        "admin",
        "The scheduler's view: capacity, free resources, running jobs, queue head",
        {200: "System"},
        tags=("system",),
    ),
    api.change_system: Operation(
        "admin",
        "Change scheduler caps, reserves and per-task limits without a restart",
        {200: "SystemChange", **dict.fromkeys(_BODY_ERRORS)},
        body={"$ref": "#/components/schemas/SystemChanges"},
        tags=("system",),
    ),
}


def described(
    routes: Iterable[BaseRoute], operations: Mapping[Endpoint, Operation] = OPERATIONS
) -> list[PathOperation]:
    """Each route's method and path with its endpoint's operation, in the order of
    ``operations``.  Mounts (the page's static files) are not operations."""
    served: dict[Endpoint, list[tuple[str, str]]] = {}
    for route in routes:
        if isinstance(route, Route):
            methods = sorted((route.methods or {"GET"}) - {"HEAD"})
            served.setdefault(route.endpoint, []).extend((m, route.path) for m in methods)
    undescribed = [
        f"{method} {path}"
        for endpoint, where in served.items()
        if endpoint not in operations
        for method, path in where
    ]
    unserved = [endpoint.__name__ for endpoint in operations if endpoint not in served]
    if undescribed or unserved:
        raise LookupError(
            f"routes without an operation: {undescribed}; operations without a route: "
            f"{unserved}: describe each route's endpoint in openapi.OPERATIONS"
        )
    return [
        PathOperation(method, path, operation)
        for endpoint, operation in operations.items()
        for method, path in served[endpoint]
    ]


def tutorial_operations(registry: Registry) -> list[PathOperation]:
    """One submit operation per task with a ``route`` (the tutorial's endpoints)."""
    links = _job_links("$response.body#/task_id")
    return [
        PathOperation(
            "POST",
            path,
            Operation(
                "submit",
                f"Submit a {task.name!r} job with its arguments as the body",
                {200: "Accepted", 202: "Accepted", 409: None, **dict.fromkeys(_BODY_ERRORS)},
                body=args_schema(task),
                parameters=(_IDEMPOTENCY_KEY,),
                tags=("tutorial",),
                links={200: links, 202: links},
            ),
        )
        for path, task in registry.by_route().items()
    ]


def operations_for(registry: Registry) -> list[PathOperation]:
    """Every route the app serves, described, with the bulk filters' ``task`` narrowed to
    the task names this server knows (the submit body is narrowed by its schema:
    ``submission_schemas``)."""
    names = registry.names()
    narrowed = {
        **OPERATIONS,
        api.cancel_jobs: replace(
            OPERATIONS[api.cancel_jobs], body=_bulk_filter(("queued", "running"), names)
        ),
        api.retry_jobs: replace(
            OPERATIONS[api.retry_jobs], body=_bulk_filter(("failed", "cancelled"), names)
        ),
    }
    return [*described(api.routes, narrowed), *tutorial_operations(registry)]


def access_rules(operations: Iterable[PathOperation]) -> list[tuple[str, str, str | None]]:
    """(method, path template, scope) for the access middleware."""
    return [(method, path, op.scope) for method, path, op in operations]


# Each event of GET /api/v1/jobs/{job_id}/events, as an event-stream parser reads it.
_JOB_EVENT = {
    "oneOf": [
        {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"type": "string", "enum": ["job"]},
                "id": {"type": "string", "description": "the document's ETag"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/Job"},
                },
            },
        },
        {
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": ["end"]},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/JobEnd"},
                },
            },
        },
    ]
}


def document(
    operations: Iterable[PathOperation],
    version: str,
    *,
    schemas: Mapping[str, Any] | None = None,
    guarded: bool = True,
    rate_limited: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document.  ``schemas``: the per-server schemas beside ``SCHEMAS``
    (``submission_schemas``).  ``guarded``: the server asks for tokens, so its guarded
    operations declare bearer security and answer 401 and 403; an anonymous server
    declares neither.  ``rate_limited``: a rate limit is configured (429)."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path, op in operations:
        responses: dict[str, Any] = {}
        codes = dict(op.responses)
        if op.scope is not None:
            guards = (401, 403) if guarded else ()
            codes.update(dict.fromkeys(c for c in (*guards, 503) if c not in codes))
            if rate_limited:
                codes.setdefault(429, None)
        for status, schema in sorted(codes.items()):
            ref = schema or (None if status < 400 else "Error")
            description = _ERROR_TEXT.get(status, "OK") if status >= 400 else "OK"
            if status == 202:
                description = "accepted"
            content: dict[str, Any]
            if ref == EVENTS:
                content = {ref: {"schema": _JOB_EVENT}}
            elif ref in (TEXT, ANY_FILE, HTML):
                content = {ref: {"schema": {"type": "string", "format": "binary"}}}
            else:
                content = {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}
                    if ref
                    else {"schema": {"type": "object"}}
                }
            responses[str(status)] = {"description": description, "content": content}
            if status in op.links:
                responses[str(status)]["links"] = {
                    name: {
                        "operationId": _operation_id(link.method, link.path),
                        "parameters": dict(link.parameters),
                    }
                    for name, link in op.links[status].items()
                }
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": _operation_id(method, path),
            "tags": list(op.tags),
            "responses": responses,
        }
        if op.description:
            operation["description"] = op.description
        if op.parameters:
            operation["parameters"] = [dict(p) for p in op.parameters]
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": dict(op.body)}},
            }
        if guarded:
            operation["security"] = [] if op.scope is None else [{"bearer": []}]
        if op.scope is not None:
            # Also on an anonymous server: the scope a token will need once there are some.
            operation["x-required-scope"] = op.scope
        paths.setdefault(path, {})[method.lower()] = operation
    components: dict[str, Any] = {"schemas": {**SCHEMAS, **(schemas or {})}}
    described: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "jobserver",
            "version": version,
            "description": "Long-running Python functions as an HTTP job service. "
            "Every error is {'error': {'code', 'message', 'details'}}. "
            + (
                "Every operation but the open ones needs a bearer token."
                if guarded
                else "This server has no tokens: it serves anyone who can connect "
                "(it asks for tokens once `jobserver token create` made one)."
            ),
        },
        "paths": paths,
        "components": components,
    }
    if guarded:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "a token from `jobserver token create`; scopes: submit, "
                "read, cancel, admin (admin implies all and sees every client's jobs)",
            }
        }
        described["security"] = [{"bearer": []}]
    return described


def _operation_id(method: str, path: str) -> str:
    words = [part for part in path.replace("{", "").replace("}", "").split("/") if part]
    return method.lower() + "_" + "_".join(w.replace("-", "_").replace(".", "_") for w in words)
