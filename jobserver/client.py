"""The Python client: submit jobs to a jobserver and wait for their results over HTTP.

    from jobserver.client import Client

    with Client("http://127.0.0.1:8000", token="...") as client:
        job = client.submit("run_long_analysis", dataset_id="x", complexity=3)
        result = job.wait(timeout=600)     # the result, or raises JobFailed

``AsyncClient`` / ``AsyncJob`` are the same API for asyncio (``await job.wait()``).

Waiting uses the server's long polling (``GET /api/v1/jobs/{id}?wait=30`` with the last
ETag in If-None-Match): the server answers as soon as the job changes, so a job that runs
ten minutes costs about twenty requests, not six hundred.

Exceptions (all ``errors.JobServerError``, so ``.code``, ``.message``, ``.details``):

    ClientError        the server refused the request (``.status``: 4xx/5xx) or could not
                       be reached (``.status`` None, code ``unreachable``)
    JobFailed          the job ended ``failed``; ``.error`` is its error document
    └── JobCancelled   the job ended ``cancelled``
    WaitTimeout        ``wait(timeout=...)`` ran out first (also a ``TimeoutError``)

This module only speaks HTTP: it works against a server on another box.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from jobserver.errors import JobServerError

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ClientError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "WaitTimeout",
]

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
LONG_POLL_SECONDS = 30.0  # the server allows up to 60
_NETWORK_SLACK = 10.0  # the HTTP timeout beyond the server's wait


class ClientError(JobServerError):
    """A request the server answered with an error, or could not answer at all."""

    def __init__(self, message: str, details: Any = None, *, code: str, status: int | None) -> None:
        super().__init__(message, details, code=code)
        self.status = status


class JobFailed(JobServerError):
    """The job ended without a result; ``error`` is its error document
    (``{"type", "message", "traceback"}``) and ``job`` the whole job document."""

    code = "job_failed"

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.error: dict[str, Any] = job.get("error") or {
            "type": job["state"].capitalize(),
            "message": job.get("reason") or job["state"],
            "traceback": None,
        }
        super().__init__(
            f"job {job['id']} ({job['task']}) {job['state']}: "
            f"{self.error.get('type')}: {self.error.get('message')}",
            self.error,
        )


class JobCancelled(JobFailed):
    code = "job_cancelled"


class WaitTimeout(JobServerError, TimeoutError):
    code = "wait_timeout"


# -- what both clients share: requests and their answers -------------------------------


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": "jobserver-client"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _answer(response: httpx.Response) -> Any:
    """The JSON body of a successful response; a ``ClientError`` from the error envelope."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and body is not None:
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": f"HTTP {response.status_code}"}
    raise ClientError(
        f"{response.request.method} {response.request.url.path}: "
        f"{error.get('message') or response.reason_phrase}",
        error.get("details"),
        code=str(error.get("code") or "http_error"),
        status=response.status_code,
    )


def _unreachable(url: str, exc: httpx.HTTPError) -> ClientError:
    return ClientError(
        f"cannot reach the jobserver at {url}: {exc}; is it running?",
        str(exc),
        code="unreachable",
        status=None,
    )


def _outcome(document: dict[str, Any]) -> Any:
    """The result of a finished job, or its failure raised."""
    state = document["state"]
    if state == "succeeded":
        return document.get("result")
    if state == "cancelled":
        raise JobCancelled(document)
    raise JobFailed(document)


def _submission(task: str, args: dict[str, Any], priority: int) -> dict[str, Any]:
    if not isinstance(task, str) or not task:
        raise ValueError("task must be the name of a registered task")
    return {"task": task, "args": args, "priority": priority}


def _list_params(state: str | None, task: str | None, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if state is not None:
        params["state"] = state
    if task is not None:
        params["task"] = task
    return params


class _JobView:
    """The fields of a job document, for both ``Job`` and ``AsyncJob``."""

    document: dict[str, Any]
    version: str | None

    @property
    def id(self) -> str:
        return str(self.document["id"])

    @property
    def task(self) -> str:
        return str(self.document["task"])

    @property
    def state(self) -> str:
        return str(self.document["state"])

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def result(self) -> Any:
        return self.document.get("result")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.document.get("error")

    @property
    def progress(self) -> dict[str, Any] | None:
        """``{"fraction", "message", "updated_at"}`` where the server reports progress."""
        return self.document.get("progress")

    def _update(self, response: httpx.Response) -> None:
        self.document = _answer(response)
        self.version = response.headers.get("etag")

    def _poll_request(self, deadline: float | None) -> tuple[dict[str, Any], dict[str, str], float]:
        """Query, headers and HTTP timeout for the next long poll."""
        wait = LONG_POLL_SECONDS
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        headers = {"If-None-Match": self.version} if self.version else {}
        return {"wait": f"{wait:.3f}"}, headers, wait + _NETWORK_SLACK

    def _timed_out(self, timeout: float | None) -> WaitTimeout:
        return WaitTimeout(
            f"job {self.id} is still {self.state} after {timeout} s",
            {"id": self.id, "state": self.state},
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.task} {self.state}>"


# -- the blocking client ---------------------------------------------------------------


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    def submit(self, task: str, /, **args: Any) -> Job:
        """Submit ``task`` with keyword arguments; the job is stored when this returns."""
        return self.submit_job(task, args)

    def submit_job(self, task: str, args: dict[str, Any], *, priority: int = 0) -> Job:
        """Submit with an argument dict and a priority (-1000..1000, higher runs first)."""
        response = self.request("POST", "/api/v1/jobs", json=_submission(task, args, priority))
        return Job(self, response)

    def job(self, job_id: str) -> Job:
        return Job(self, self.request("GET", f"/api/v1/jobs/{job_id}"))

    def jobs(
        self, *, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        """The newest jobs first, optionally of one state and/or task."""
        body = _answer(self.request("GET", "/api/v1/jobs", params=_list_params(state, task, limit)))
        return [Job.from_document(self, document) for document in body["jobs"]]

    def stats(self) -> list[dict[str, Any]]:
        """Per task: counts by state, success rate, p50/p95 duration, peak memory."""
        tasks: list[dict[str, Any]] = _answer(self.request("GET", "/api/v1/stats"))["tasks"]
        return tasks


class Job(_JobView):
    """A submitted job as last seen; ``refresh()`` reads it again."""

    def __init__(self, client: Client, response: httpx.Response) -> None:
        self._client = client
        self._update(response)

    @classmethod
    def from_document(cls, client: Client, document: dict[str, Any]) -> Job:
        job = cls.__new__(cls)
        job._client, job.document, job.version = client, document, None
        return job

    def refresh(self) -> Job:
        self._update(self._client.request("GET", f"/api/v1/jobs/{self.id}"))
        return self

    def cancel(self) -> Job:
        """Cancel: a queued job at once, a running one when its process has stopped."""
        self._update(self._client.request("POST", f"/api/v1/jobs/{self.id}/cancel"))
        return self

    def wait(
        self,
        timeout: float | None = None,
        on_change: Callable[[Job], None] | None = None,
    ) -> Any:
        """Block until the job ends; return its result, or raise ``JobFailed`` /
        ``JobCancelled`` with its error, or ``WaitTimeout`` after ``timeout`` seconds.
        ``on_change`` is called with the job after every change seen (state, progress)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(timeout)
            before = self.version
            params, headers, http_timeout = self._poll_request(deadline)
            response = self._client.request(
                "GET", f"/api/v1/jobs/{self.id}", params=params, headers=headers,
                timeout=http_timeout,
            )  # fmt: skip
            self._update(response)
            if on_change is not None and self.version != before:
                on_change(self)
        return _outcome(self.document)


# -- the asyncio client ----------------------------------------------------------------


class AsyncClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    async def submit(self, task: str, /, **args: Any) -> AsyncJob:
        return await self.submit_job(task, args)

    async def submit_job(self, task: str, args: dict[str, Any], *, priority: int = 0) -> AsyncJob:
        body = _submission(task, args, priority)
        return AsyncJob(self, await self.request("POST", "/api/v1/jobs", json=body))

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self.request("GET", f"/api/v1/jobs/{job_id}"))

    async def jobs(
        self, *, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[AsyncJob]:
        params = _list_params(state, task, limit)
        body = _answer(await self.request("GET", "/api/v1/jobs", params=params))
        return [AsyncJob.from_document(self, document) for document in body["jobs"]]

    async def stats(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = _answer(await self.request("GET", "/api/v1/stats"))["tasks"]
        return tasks


class AsyncJob(_JobView):
    def __init__(self, client: AsyncClient, response: httpx.Response) -> None:
        self._client = client
        self._update(response)

    @classmethod
    def from_document(cls, client: AsyncClient, document: dict[str, Any]) -> AsyncJob:
        job = cls.__new__(cls)
        job._client, job.document, job.version = client, document, None
        return job

    async def refresh(self) -> AsyncJob:
        self._update(await self._client.request("GET", f"/api/v1/jobs/{self.id}"))
        return self

    async def cancel(self) -> AsyncJob:
        self._update(await self._client.request("POST", f"/api/v1/jobs/{self.id}/cancel"))
        return self

    async def wait(
        self,
        timeout: float | None = None,
        on_change: Callable[[AsyncJob], None] | None = None,
    ) -> Any:
        """As ``Job.wait``, without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(timeout)
            before = self.version
            params, headers, http_timeout = self._poll_request(deadline)
            response = await self._client.request(
                "GET", f"/api/v1/jobs/{self.id}", params=params, headers=headers,
                timeout=http_timeout,
            )  # fmt: skip
            self._update(response)
            if on_change is not None and self.version != before:
                on_change(self)
        return _outcome(self.document)
