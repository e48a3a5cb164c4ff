"""The baseline: a bare Starlette app, as the issue measured it (JSON body parsed, tiny
JSON answer), served by one uvicorn process with the access log as configured."""

from __future__ import annotations

import itertools

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

_ids = itertools.count()


async def submit(request: Request) -> Response:
    body = await request.json()
    return JSONResponse({"id": str(next(_ids)), "task": body.get("task")}, status_code=202)


async def poll(request: Request) -> Response:
    return JSONResponse({"id": request.path_params["job_id"], "state": "succeeded"})


app = Starlette(
    routes=[
        Route("/jobs", submit, methods=["POST"]),
        Route("/jobs/{job_id}", poll, methods=["GET"]),
    ]
)
