"""``/openapi.json`` describes every route the server serves, and the server does what it
says: schemathesis fuzzes a real server from the document (bounded), and every response
must be documented, match its schema and never be a 5xx."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from jobserver import api, config, openapi
from jobserver.access import create_token
from jobserver.server import build
from jobserver.store import migrate
from tests.conftest import FakeProbe, ServerProcess, start_server, write_config

# A few quick tasks: a fuzzer that finds a valid body starts real jobs.
FUZZ_TASKS = {
    "add": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "16MiB", "route": "/api/v1/add"},
    "echo": {"function": "sample_tasks:echo", "cpus": 0.1, "memory": "16MiB"},
    "analysis": {
        "function": "jobserver.demo:run_long_analysis",
        "cpus": 0.1,
        "memory": "16MiB",
        "route": "/api/v1/start-analysis",
    },
}


def test_every_served_route_is_described(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, tasks=FUZZ_TASKS))
    migrate(settings.server.database)
    application = build(settings, probe=FakeProbe())
    served = {
        (method, route.path)
        for route in application.app.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    document = httpx_get_document(application)
    described = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert served == described
    # Every guarded operation says which scope it needs (also on this server without
    # tokens, which describes no security); the open ones are exactly these.
    open_ops = {
        (m.upper(), p)
        for p, item in document["paths"].items()
        for m, op in item.items()
        if "x-required-scope" not in op
    }
    # The web page is a shell with no data in it: it asks for a token for every API call.
    assert open_ops == {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
    }
    assert document["paths"]["/api/v1/add"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ] == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }


def httpx_get_document(application: Any) -> dict[str, Any]:
    import anyio

    async def fetch() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=application.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/openapi.json")
            assert response.status_code == 200
            document: dict[str, Any] = response.json()
            return document

    return anyio.run(fetch)


def test_every_route_of_the_api_has_an_operation() -> None:
    served = {
        (method, route.path)
        for route in api.routes
        if isinstance(route, Route)
        for method in (route.methods or set()) - {"HEAD"}
    }
    rows = openapi.described(api.routes)
    assert {(method, path) for method, path, _ in rows} == served
    assert len(rows) == len(served)


async def undescribed(request: Any) -> Any:
    raise AssertionError("never served")


def test_a_route_without_an_operation_is_refused() -> None:
    with pytest.raises(LookupError, match=r"routes without an operation: \['POST /api/v1/new'\]"):
        openapi.described([*api.routes, Route("/api/v1/new", undescribed, methods=["POST"])])


def test_an_operation_without_a_route_is_refused() -> None:
    routes = [r for r in api.routes if getattr(r, "endpoint", None) is not api.healthz]
    with pytest.raises(LookupError, match=r"operations without a route: \['healthz'\]"):
        openapi.described(routes)


def test_scopes_in_the_document_are_the_scopes_enforced() -> None:
    rules = openapi.access_rules(openapi.described(api.routes))
    assert ("POST", "/api/v1/jobs", "submit") in rules
    assert ("POST", "/api/v1/jobs/{job_id}/cancel", "cancel") in rules
    assert ("GET", "/api/v1/system", "admin") in rules
    assert ("GET", "/healthz", None) in rules


# -- schemathesis against a real server ------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("fuzz")
    server = start_server(
        write_config(
            directory,
            server={"max_body_size": "64KiB"},
            scheduler={"max_jobs": 2},
            tasks=FUZZ_TASKS,
        )
    )
    yield server
    server.stop(signal.SIGTERM)
    if server.process.poll() is None:
        server.process.kill()


@pytest.mark.integration
def test_server_does_what_its_document_says(fuzzed_server: ServerProcess) -> None:
    """Each operation gets up to 30 generated requests (schemathesis' strategies driven by
    Hypothesis, no shrinking past the first failure)."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    described = {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method in item
    }
    # schemathesis leaves out the document's own path; everything else is fuzzed.
    assert {op.label for op in operations} == described - {"GET /openapi.json"}
    # Twice round: the reads of the second round find the jobs the first one created.
    for operation in operations * 2:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def exercise(case: Any) -> None:
            case.call_and_validate(
                checks=[
                    not_a_server_error,
                    status_code_conformance,
                    content_type_conformance,
                    response_schema_conformance,
                ],
            )

        exercise()


@pytest.mark.integration
def test_fuzzed_server_is_still_healthy(fuzzed_server: ServerProcess) -> None:
    assert httpx.get(f"{fuzzed_server.url}/healthz", timeout=5).status_code == 200
    assert "Traceback" not in fuzzed_server.log()


# -- the description follows the server's configuration ---------------------------------


def served_document(tmp_path: Path, **server: Any) -> tuple[Any, dict[str, Any]]:
    settings = config.load(write_config(tmp_path, server=server or None, tasks=FUZZ_TASKS))
    migrate(settings.server.database)
    application = build(settings, probe=FakeProbe(), host="127.0.0.1")
    return application, httpx_get_document(application)


def test_an_anonymous_server_describes_no_security(tmp_path: Path) -> None:
    """On loopback without tokens every request is served: no scheme, no 401/403."""
    _, document = served_document(tmp_path)
    assert "security" not in document
    assert "securitySchemes" not in document["components"]
    for item in document["paths"].values():
        for operation in item.values():
            assert "security" not in operation
            assert not {"401", "403"} & set(operation["responses"])


def test_a_server_with_tokens_describes_bearer_security(tmp_path: Path) -> None:
    """The document follows the tokens file: created after the start, it is described."""
    application, before = served_document(tmp_path)
    assert "security" not in before
    create_token(tmp_path / "tokens.json", "client", ["submit", "read", "cancel"])
    time.sleep(0.6)  # the tokens file is rechecked at most every half second
    document = httpx_get_document(application)
    assert document["security"] == [{"bearer": []}]
    submit = document["paths"]["/api/v1/jobs"]["post"]
    assert submit["security"] == [{"bearer": []}]
    assert {"401", "403"} <= set(submit["responses"])
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_the_submit_body_is_one_schema_per_task(tmp_path: Path) -> None:
    _, document = served_document(tmp_path)
    schemas = document["components"]["schemas"]
    submission = schemas["Submission"]
    assert submission["discriminator"]["propertyName"] == "task"
    assert set(submission["discriminator"]["mapping"]) == set(FUZZ_TASKS)
    add = schemas["Submission.add"]
    assert add["properties"]["task"] == {"type": "string", "enum": ["add"]}
    assert add["required"] == ["task", "args"]  # add's a has no default
    assert add["properties"]["args"]["required"] == ["a"]
    # run_at and delay exclude each other, as the server checks
    assert add["not"] == {"required": ["run_at", "delay"]}
    assert add["properties"]["max_retries"]["maximum"] == 10
    assert add["properties"]["depends_on"]["items"]["pattern"] == openapi.JOB_ID_PATTERN


def test_listing_cursor_logs_tail_and_events_are_described_as_served(tmp_path: Path) -> None:
    _, document = served_document(tmp_path)
    paths = document["paths"]
    cursor = next(p for p in paths["/api/v1/jobs"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["pattern"] == "^([0-9A-Za-z]{26})?$"  # empty: the first page
    tail = next(
        p for p in paths["/api/v1/jobs/{job_id}/logs"]["get"]["parameters"] if p["name"] == "tail"
    )
    assert tail["schema"]["maximum"] == api.MAX_TAIL
    events = paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    job_event = events["text/event-stream"]["schema"]["oneOf"][0]
    assert job_event["properties"]["data"]["contentSchema"] == {"$ref": "#/components/schemas/Job"}
    # Links lead from a submit to the operations on that job.
    links = paths["/api/v1/jobs"]["post"]["responses"]["202"]["links"]
    assert links["GetJob"] == {
        "operationId": "get_api_v1_jobs_job_id",
        "parameters": {"job_id": "$response.body#/id"},
    }
    assert {"CancelJob", "RetryJob", "JobLogs", "JobEvents", "TaskStatus"} <= set(links)


def test_the_system_change_body_names_the_keys_that_change_at_run_time(tmp_path: Path) -> None:
    """PATCH /api/v1/system's body: every [scheduler] key, and per task of this server its
    run-time keys; nothing else."""
    _, document = served_document(tmp_path)
    patch = document["paths"]["/api/v1/system"]["patch"]
    body = patch["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/SystemChanges"}
    changes = document["components"]["schemas"]["SystemChanges"]
    assert changes["additionalProperties"] is False
    scheduler = changes["properties"]["scheduler"]
    assert set(scheduler["properties"]) == {f.name for f in fields(config.SchedulerSettings)}
    tasks = changes["properties"]["tasks"]
    assert set(tasks["properties"]) == set(FUZZ_TASKS)
    for task in tasks["properties"].values():
        assert set(task["properties"]) == set(config.RUNTIME_TASK_KEYS)
        assert task["additionalProperties"] is False
    assert scheduler["properties"]["kill_grace"]["oneOf"][1]["type"] == "string"
    # Sizes and durations in config.toml's spellings: changes the server applies.
    settings = config.load(write_config(tmp_path, tasks=FUZZ_TASKS))
    taken = {
        "scheduler": {"max_jobs": 3, "kill_grace": "5s", "reserve_memory": "64MiB"},
        "tasks": {"add": {"memory": 1048576, "timeout": None}},
    }
    changed = config.apply_changes(settings, taken, "PATCH /api/v1/system")
    assert changed.scheduler.max_jobs == 3 and changed.scheduler.kill_grace == 5
    assert changed.tasks["add"].memory == 1048576


def test_an_artifact_is_described_as_any_media_type(tmp_path: Path) -> None:
    """Served as the type its name suggests (text/plain for note.txt), not always binary."""
    _, document = served_document(tmp_path)
    artifact = document["paths"]["/api/v1/jobs/{job_id}/artifacts/{name}"]["get"]
    assert set(artifact["responses"]["200"]["content"]) == {"*/*"}


def test_the_idempotency_key_is_described_as_the_server_takes_it(tmp_path: Path) -> None:
    """1 to 255 printable ASCII characters: the server refuses others with 422."""
    _, document = served_document(tmp_path)
    submit = document["paths"]["/api/v1/jobs"]["post"]
    key = next(p for p in submit["parameters"] if p["name"] == "Idempotency-Key")
    pattern = re.compile(key["schema"]["pattern"])
    for taken in ("a", "0f8fad5b-d9cb-469f-a165-70867728950e", "a b", "~" * 255):
        assert pattern.fullmatch(taken), taken
    for refused in ("", "\u0090", "é", "x" * 256, "tab\there"):
        assert not pattern.fullmatch(refused), refused
