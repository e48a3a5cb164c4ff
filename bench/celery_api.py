"""The tutorial's ``main.py``: its FastAPI app over ``bench/celery_tasks.py``, with its two
routes as written there, plus ``POST /api/v1/noop`` and ``POST /api/v1/stamp`` in the same
shape (``.delay()``, 202 with the task id) for the end-to-end and dispatch figures."""

from __future__ import annotations

from typing import Any

from celery.result import AsyncResult
from fastapi import FastAPI, status
from pydantic import BaseModel

from bench.celery_tasks import celery_app, noop, run_long_analysis, stamp

app = FastAPI(title="异步任务API", description="使用 FastAPI 和 Celery")


class TaskRequest(BaseModel):
    dataset_id: str
    complexity: int


class TaskResponse(BaseModel):
    message: str
    task_id: str


@app.post(
    "/api/v1/start-analysis", status_code=status.HTTP_202_ACCEPTED, response_model=TaskResponse
)
def start_analysis(request: TaskRequest) -> dict[str, Any]:
    task = run_long_analysis.delay(request.dataset_id, request.complexity)
    return {"message": "任务已接收,正在后台处理", "task_id": task.id}


@app.get("/api/v1/task-status/{task_id}")
def get_task_status(task_id: str) -> dict[str, Any]:
    task_result = AsyncResult(task_id, app=celery_app)
    if task_result.ready():
        if task_result.successful():
            return {"task_id": task_id, "status": task_result.status, "result": task_result.result}
        return {"task_id": task_id, "status": task_result.status, "error": str(task_result.info)}
    return {"task_id": task_id, "status": task_result.status}


@app.post("/api/v1/noop", status_code=status.HTTP_202_ACCEPTED, response_model=TaskResponse)
def submit_noop() -> dict[str, Any]:
    return {"message": "task accepted", "task_id": noop.delay().id}


@app.post("/api/v1/stamp", status_code=status.HTTP_202_ACCEPTED, response_model=TaskResponse)
def submit_stamp() -> dict[str, Any]:
    return {"message": "task accepted", "task_id": stamp.delay().id}
