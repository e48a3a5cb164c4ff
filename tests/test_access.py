"""Bearer tokens, scopes, owners and rate limits, through the whole app (in process)."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from jobserver import access, config
from jobserver.access import RateLimiter, create_token, hash_secret, read_tokens, revoke_token
from jobserver.errors import ConfigError
from jobserver.jobs import format_timestamp, utcnow
from jobserver.server import build, check_exposure
from jobserver.store import migrate
from tests.conftest import FakeProbe, write_config

pytestmark = pytest.mark.anyio
JOBSERVER = (sys.executable, "-m", "jobserver")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def make_tokens(directory: Path) -> dict[str, str]:
    path = directory / "tokens.json"
    return {
        "alice": create_token(path, "alice", ["submit", "read", "cancel"]),
        "bob": create_token(path, "bob", ["submit", "read", "cancel"]),
        "reader": create_token(path, "reader", ["read"]),
        "admin": create_token(path, "admin", ["admin"]),
    }


async def test_no_or_bad_token_is_401_on_every_guarded_route(
    make_harness: Any, tmp_path: Path
) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness() as h:
        guarded = [
            ("POST", "/api/v1/jobs", {"task": "add", "args": {"a": 1}}),
            ("GET", "/api/v1/jobs", None),
            ("GET", "/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ", None),
            ("POST", "/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ/cancel", None),
            ("GET", "/api/v1/task-status/01ZZZZZZZZZZZZZZZZZZZZZZZZ", None),
            ("POST", "/api/v1/start-analysis", {"dataset_id": "x", "complexity": 0}),
            ("GET", "/api/v1/tasks", None),
            ("GET", "/api/v1/system", None),
            ("GET", "/no/such/route", None),
        ]
        for headers in ({}, bearer("jst_not-a-real-token"), {"Authorization": "Basic eDp5"}):
            for method, path, body in guarded:
                response = await h.client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers, response.text)
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert (await h.client.get("/healthz")).status_code == 200
        assert (await h.client.get("/openapi.json")).status_code == 200
        assert (await h.client.get("/api/v1/jobs")).status_code == 401
        # Nothing was stored by any refused submit.
        admin = (await h.client.get("/api/v1/jobs", headers=bearer(tokens["admin"]))).json()
        assert admin["jobs"] == []


async def test_missing_scope_is_403_naming_it(make_harness: Any, tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness() as h:
        refused = await h.client.post(
            "/api/v1/jobs", json={"task": "add", "args": {"a": 1}}, headers=bearer(tokens["reader"])
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
        assert refused.json()["error"]["details"]["required_scope"] == "submit"
        system = await h.client.get("/api/v1/system", headers=bearer(tokens["alice"]))
        assert system.status_code == 403
        assert (await h.client.get("/api/v1/system", headers=bearer(tokens["admin"]))).is_success
        tutorial = await h.client.post(
            "/api/v1/start-analysis",
            json={"dataset_id": "x", "complexity": 0},
            headers=bearer(tokens["reader"]),
        )
        assert tutorial.status_code == 403


async def test_clients_see_and_cancel_only_their_own_jobs(
    make_harness: Any, tmp_path: Path
) -> None:
    tokens = make_tokens(tmp_path)
    gate = tmp_path / "gate"
    async with make_harness() as h:
        alice, bob, admin = bearer(tokens["alice"]), bearer(tokens["bob"]), bearer(tokens["admin"])
        submitted = await h.client.post(
            "/api/v1/jobs",
            json={"task": "wait_for_file", "args": {"path": str(gate)}},
            headers=alice,
        )
        assert submitted.status_code == 202
        job = submitted.json()
        assert job["owner"] == "alice"
        tutorial = await h.client.post(
            "/api/v1/start-analysis", json={"dataset_id": "d", "complexity": 0}, headers=bob
        )
        bobs_id = tutorial.json()["task_id"]

        # Bob cannot tell alice's job from a job that does not exist: 404, not 403.
        for method, path in [
            ("GET", f"/api/v1/jobs/{job['id']}"),
            ("POST", f"/api/v1/jobs/{job['id']}/cancel"),
            ("GET", f"/api/v1/task-status/{job['id']}"),
        ]:
            response = await h.client.request(method, path, headers=bob)
            assert response.status_code == 404, (method, path)
            assert response.json()["error"]["code"] == "not_found"
        assert [
            j["id"] for j in (await h.client.get("/api/v1/jobs", headers=bob)).json()["jobs"]
        ] == [bobs_id]
        assert [
            j["id"] for j in (await h.client.get("/api/v1/jobs", headers=alice)).json()["jobs"]
        ] == [job["id"]]
        everything = (await h.client.get("/api/v1/jobs", headers=admin)).json()["jobs"]
        assert {j["id"] for j in everything} == {job["id"], bobs_id}
        assert (
            await h.client.get(f"/api/v1/task-status/{bobs_id}", headers=alice)
        ).status_code == 404
        assert (await h.client.get(f"/api/v1/task-status/{bobs_id}", headers=bob)).is_success

        # Alice's job still runs (bob's cancel did nothing); alice may cancel it; so may admin.
        assert (await h.client.get(f"/api/v1/jobs/{job['id']}", headers=alice)).json()[
            "cancel_requested"
        ] is False
        cancelled = await h.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=admin)
        assert cancelled.status_code in (200, 202)
        done = await wait_as(h.client, job["id"], alice, "cancelled")
        assert done["owner"] == "alice"


async def wait_as(
    client: httpx.AsyncClient, job_id: str, headers: dict[str, str], *states: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        document: dict[str, Any] = (
            await client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        ).json()
        if document.get("state") in states or time.monotonic() > deadline:
            assert document.get("state") in states, document
            return document
        await anyio.sleep(0.02)


async def test_tokens_created_and_revoked_while_running_take_effect(
    make_harness: Any, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    first = create_token(path, "first", ["read"])
    async with make_harness() as h:
        assert (await h.client.get("/api/v1/jobs", headers=bearer(first))).is_success
        later = create_token(path, "later", ["read"])
        revoke_token(path, "first")
        deadline = time.monotonic() + 10  # the file is re-read at most every 0.5 s
        while time.monotonic() < deadline:
            if (await h.client.get("/api/v1/jobs", headers=bearer(later))).is_success:
                break
            await anyio.sleep(0.02)
        assert (await h.client.get("/api/v1/jobs", headers=bearer(later))).is_success
        assert (await h.client.get("/api/v1/jobs", headers=bearer(first))).status_code == 401


def test_tokens_file_keeps_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    secret = create_token(path, "ci", ["submit", "read"])
    text = path.read_text()
    assert secret not in text
    assert hash_secret(secret) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    [token] = read_tokens(path)
    assert token.scopes == ("submit", "read")
    with pytest.raises(ConfigError, match="already exists"):
        create_token(path, "ci", ["read"])
    with pytest.raises(ConfigError, match="unknown scope"):
        access.parse_scopes("read,write")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        read_tokens(path)


def test_cli_token_create_prints_the_secret_once(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    created = subprocess.run(
        [
            *JOBSERVER,
            "token",
            "create",
            "ci",
            "--scopes",
            "submit,read",
            "--config",
            str(config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("jst_") and "shown only once" in created.stderr
    stored = json.loads((tmp_path / "tokens.json").read_text())
    assert stored["tokens"][0]["hash"] == hash_secret(secret)
    listed = subprocess.run(
        [sys.executable, "-m", "jobserver", "token", "list", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ci\tsubmit,read" in listed.stdout and secret not in listed.stdout
    bad = subprocess.run(
        [*JOBSERVER, "token", "create", "x", "--scopes", "root", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown scope" in bad.stderr


async def test_rate_limit_answers_429_with_retry_after(make_harness: Any, tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness(server={"rate_limit": 0.5, "rate_burst": 3}) as h:
        statuses = [
            (await h.client.get("/api/v1/jobs", headers=bearer(tokens["alice"]))).status_code
            for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        limited = await h.client.get("/api/v1/jobs", headers=bearer(tokens["alice"]))
        assert limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) >= 1
        # Per token: bob's bucket is his own.
        assert (await h.client.get("/api/v1/jobs", headers=bearer(tokens["bob"]))).is_success


def test_rate_limiter_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("b") == 0


def test_safe_by_default_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path))
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0"):
        check_exposure(settings.server, "0.0.0.0")
    check_exposure(settings.server, "127.0.0.1")
    check_exposure(settings.server, "::1")
    check_exposure(settings.server, "localhost")
    open_settings = config.load(write_config(tmp_path, server={"allow_anonymous": True}))
    check_exposure(open_settings.server, "0.0.0.0")
    create_token(settings.server.tokens_file, "ci", ["read"])
    check_exposure(settings.server, "0.0.0.0")


def test_serve_refuses_a_public_address_without_tokens(tmp_path: Path) -> None:
    result = subprocess.run(
        [*JOBSERVER, "serve", "--config", str(write_config(tmp_path)), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "allow_anonymous" in result.stderr


async def test_public_bind_with_tokens_revoked_stays_closed(tmp_path: Path) -> None:
    # Started on a public address with tokens; all revoked later: closed, not open.
    settings = config.load(write_config(tmp_path))
    migrate(settings.server.database)
    application = build(settings, probe=FakeProbe(), host="0.0.0.0")
    transport = httpx.ASGITransport(app=application.app)
    async with (
        application.app.router.lifespan_context(application.app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        response = await client.get("/api/v1/jobs")
        assert response.status_code == 401
        assert "no tokens" in response.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200


async def test_revoking_the_last_token_keeps_a_loopback_server_closed(
    make_harness: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobserver.access")
    path = tmp_path / "tokens.json"
    secret = create_token(path, "only", ["read"])

    async def status(headers: dict[str, str] | None = None) -> int:
        return (await h.client.get("/api/v1/jobs", headers=headers)).status_code

    async def until(expected: int) -> None:
        deadline = time.monotonic() + 10  # the file is re-read at most every 0.5 s
        while await status() != expected:
            assert time.monotonic() < deadline, f"never {expected}"
            await anyio.sleep(0.02)

    async with make_harness() as h:  # on loopback: open only while no tokens file exists
        assert await status(bearer(secret)) == 200 and await status() == 401
        assert "access: 1 token(s) in" in caplog.text
        revoke_token(path, "only")
        assert read_tokens(path) == [] and path.exists()
        deadline = time.monotonic() + 10  # requests re-read the file every 0.5 s
        while "has no tokens left (all revoked)" not in caplog.text:
            assert time.monotonic() < deadline, "the revocation was never seen"
            assert await status() == 401  # never open meanwhile
            await anyio.sleep(0.02)
        response = await h.client.get("/api/v1/jobs")
        assert response.status_code == 401
        assert "all revoked" in response.json()["error"]["message"]
        # Removing the file says "no tokens here": a loopback server is open again.
        path.unlink()
        await until(200)
        assert "open to anyone who can connect (loopback only)" in caplog.text


async def test_allow_anonymous_opens_a_server_whose_tokens_were_all_revoked(
    make_harness: Any, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.json"
    create_token(path, "only", ["read"])
    revoke_token(path, "only")
    async with make_harness() as h:
        assert (await h.client.get("/api/v1/jobs")).status_code == 401
    async with make_harness(server={"allow_anonymous": True}) as h:
        assert (await h.client.get("/api/v1/jobs")).status_code == 200


@pytest.mark.integration
def test_cli_uses_jobserver_token(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path)
    secret = create_token(tmp_path / "tokens.json", "ci", ["submit", "read"])
    submit_only = create_token(tmp_path / "tokens.json", "pusher", ["submit"])
    server = server_factory(config_path)
    run = [*JOBSERVER, "submit", "add", "a=2", "b=3", "--url", server.url]
    done = subprocess.run(
        [*run, "--wait"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JOBSERVER_TOKEN": secret},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"
    pushed = subprocess.run(
        [*run, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JOBSERVER_TOKEN": submit_only},
    )
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["owner"] == "pusher"
    refused = subprocess.run(
        run, capture_output=True, text=True, timeout=60, env={**os.environ, "JOBSERVER_TOKEN": ""}
    )
    assert refused.returncode == 2
    assert "jobserver token create" in refused.stderr


async def test_lifecycle_routes_keep_clients_apart(make_harness: Any, tmp_path: Path) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness() as h:
        alice, bob = bearer(tokens["alice"]), bearer(tokens["bob"])
        made = await h.client.post(
            "/api/v1/jobs",
            json={"task": "make_files", "args": {"names": ["out.txt"]}},
            headers={**alice, "Idempotency-Key": "same-key"},
        )
        assert made.status_code == 202
        job = await wait_as(h.client, made.json()["id"], alice, "succeeded")
        assert [a["name"] for a in job["artifacts"]] == ["out.txt"]
        failed = await h.client.post(
            "/api/v1/jobs", json={"task": "fail", "args": {}}, headers=alice
        )
        await wait_as(h.client, failed.json()["id"], alice, "failed")

        for method, path in [
            ("GET", f"/api/v1/jobs/{job['id']}?wait=1"),
            ("GET", f"/api/v1/jobs/{job['id']}/logs"),
            ("GET", f"/api/v1/jobs/{job['id']}/artifacts/out.txt"),
            ("GET", f"/api/v1/jobs/{job['id']}/events"),
            ("POST", f"/api/v1/jobs/{failed.json()['id']}/retry"),
        ]:
            response = await h.client.request(method, path, headers=bob)
            assert response.status_code == 404, (method, path, response.text)
        # Alice reaches all of them.
        assert (await h.client.get(f"/api/v1/jobs/{job['id']}/logs", headers=alice)).is_success
        artifact = await h.client.get(f"/api/v1/jobs/{job['id']}/artifacts/out.txt", headers=alice)
        assert artifact.text == "content of out.txt"

        # Another client's job is no dependency of bob's: unknown, and nothing is stored.
        before = (await h.client.get("/api/v1/jobs", headers=bearer(tokens["admin"]))).json()
        depending = await h.client.post(
            "/api/v1/jobs",
            json={"task": "add", "args": {"a": 1}, "depends_on": [job["id"]]},
            headers=bob,
        )
        assert depending.status_code == 422, depending.text
        after = (await h.client.get("/api/v1/jobs", headers=bearer(tokens["admin"]))).json()
        assert len(after["jobs"]) == len(before["jobs"])

        # Idempotency keys are per client: bob's "same-key" is a new job, not alice's.
        bobs = await h.client.post(
            "/api/v1/jobs",
            json={"task": "make_files", "args": {"names": ["out.txt"]}},
            headers={**bob, "Idempotency-Key": "same-key"},
        )
        assert bobs.status_code == 202 and bobs.json()["id"] != job["id"]
        again = await h.client.post(
            "/api/v1/jobs",
            json={"task": "make_files", "args": {"names": ["out.txt"]}},
            headers={**alice, "Idempotency-Key": "same-key"},
        )
        assert again.status_code == 200 and again.json()["id"] == job["id"]


async def test_bulk_operations_touch_only_the_clients_own_jobs(
    make_harness: Any, tmp_path: Path
) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness() as h:
        alice, bob, reader = (
            bearer(tokens["alice"]),
            bearer(tokens["bob"]),
            bearer(tokens["reader"]),
        )
        body = {"task": "sleep", "args": {"seconds": 1}, "delay": 3600}
        alices = (await h.client.post("/api/v1/jobs", json=body, headers=alice)).json()
        bobs = (await h.client.post("/api/v1/jobs", json=body, headers=bob)).json()

        refused = await h.client.post("/api/v1/jobs/cancel", json={"all": True}, headers=reader)
        assert refused.status_code == 403
        assert "cancel" in refused.json()["error"]["message"]
        refused = await h.client.post("/api/v1/jobs/retry", json={"all": True}, headers=reader)
        assert refused.status_code == 403

        answer = await h.client.post("/api/v1/jobs/cancel", json={"all": True}, headers=bob)
        assert answer.json()["ids"] == [bobs["id"]]
        still = await h.client.get(f"/api/v1/jobs/{alices['id']}", headers=alice)
        assert still.json()["state"] == "queued"
        answer = await h.client.post("/api/v1/jobs/retry", json={"all": True}, headers=alice)
        assert answer.json()["count"] == 0  # bob's cancelled job is not alice's to retry


async def test_a_pruned_job_is_410_on_every_job_route_to_its_owner_only(
    make_harness: Any, tmp_path: Path
) -> None:
    tokens = make_tokens(tmp_path)
    async with make_harness() as h:
        alice, bob, admin = bearer(tokens["alice"]), bearer(tokens["bob"]), bearer(tokens["admin"])
        submitted = await h.client.post(
            "/api/v1/jobs", json={"task": "add", "args": {"a": 1}}, headers=alice
        )
        job_id = submitted.json()["id"]
        deadline = time.monotonic() + 30
        while (await h.client.get(f"/api/v1/jobs/{job_id}", headers=alice)).json()[
            "state"
        ] != "succeeded":
            assert time.monotonic() < deadline, "the job never finished"
            await anyio.sleep(0.02)
        assert h.application.pruner is not None
        later = utcnow() + timedelta(days=8)  # past the default retention of 7 days
        assert await h.application.pruner.tick(later) == [job_id]
        routes = [
            ("GET", f"/api/v1/jobs/{job_id}"),
            ("POST", f"/api/v1/jobs/{job_id}/cancel"),
            ("POST", f"/api/v1/jobs/{job_id}/retry"),
            ("GET", f"/api/v1/jobs/{job_id}/logs"),
            ("GET", f"/api/v1/jobs/{job_id}/artifacts/out.txt"),
            ("GET", f"/api/v1/jobs/{job_id}/events"),
            ("GET", f"/api/v1/task-status/{job_id}"),
        ]
        for method, path in routes:
            for headers in (alice, admin):
                response = await h.client.request(method, path, headers=headers)
                assert response.status_code == 410, (method, path, response.text)
                error = response.json()["error"]
                assert error["code"] == "gone" and "pruned" in error["message"]
                assert error["details"] == {"id": job_id, "pruned_at": format_timestamp(later)}
            # Another client cannot tell it from an id never issued.
            response = await h.client.request(method, path, headers=bob)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["code"] == "not_found"
