"""GPU scheduling on a real NVIDIA GPU through NVML (the rest of the suite uses a fake
probe).  Skipped where NVML finds no GPU: run on a GPU host with
``pip install '.[test,gpu]'``."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobserver.resources import NvmlProbe
from tests.conftest import GiB, needs, skip_for_want_of
from tests.test_scheduling import GATED, _reason, poll, submit

REAL_GPUS = NvmlProbe().gpus()

pytestmark = [
    pytest.mark.anyio,
    needs(
        "gpu",
        not REAL_GPUS,
        "needs an NVIDIA GPU, its driver and nvidia-ml-py (pip install jobserver[gpu])",
    ),
]

REPORT = {"function": "sample_tasks:cuda_report", "cpus": 0.1, "memory": "64MiB", "gpus": 1}


def test_nvml_reads_what_nvidia_smi_shows() -> None:
    assert REAL_GPUS
    for gpu in REAL_GPUS:
        assert gpu.name
        assert 0 < gpu.memory_free <= gpu.memory_total
    if shutil.which("nvidia-smi") is None:
        skip_for_want_of("gpu", "nvidia-smi is not installed")
    query = ["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split("\n")
    smi = [line.split(", ") for line in lines if line.strip()]
    assert [int(index) for index, _ in smi] == [gpu.index for gpu in REAL_GPUS]
    for (_, total_mib), gpu in zip(smi, REAL_GPUS, strict=True):
        assert abs(int(total_mib) * 2**20 - gpu.memory_total) <= 2**20


async def test_a_gpu_job_runs_on_the_device_it_was_given(make_harness: Any) -> None:
    async with make_harness(gpu_probe=NvmlProbe(), tasks={"report": REPORT}) as h:
        job_id = await submit(h, "report")
        done = await h.wait_for_state(job_id, "succeeded", "failed", timeout=120)
        assert done["state"] == "succeeded", done
        report = done["result"]
        assert report["visible"] in {str(gpu.index) for gpu in REAL_GPUS}
        if "device_count" in report:  # PyTorch is installed: CUDA shows it that one GPU
            assert report["device_count"] == 1
            assert report["sum"] == 256.0**3


async def test_gpu_jobs_wait_for_a_free_device(make_harness: Any, tmp_path: Path) -> None:
    assert REAL_GPUS
    tasks = {"gated_gpu": {**GATED, "gpus": 1}}
    async with make_harness(gpu_probe=NvmlProbe(), tasks=tasks) as h:
        gate = str(tmp_path / "gate")
        held = [await submit(h, "gated_gpu", path=gate) for _ in range(len(REAL_GPUS))]
        for job_id in held:
            await h.wait_for_state(job_id, "running", timeout=60)
        waiting = await submit(h, "gated_gpu", path=gate)
        assert await poll(lambda: _reason(h, waiting)) == ("waiting for GPUs: needs 1, 0 available")
        system = (await h.client.get("/api/v1/system")).json()
        devices = sorted(d for r in system["running"] for d in r["gpu_devices"])
        assert devices == [gpu.index for gpu in REAL_GPUS]
        Path(gate).write_text("go")
        assert (await h.wait_for_state(waiting, "succeeded", timeout=60))["result"] is not None


async def test_more_gpu_memory_than_any_gpu_has_never_starts(make_harness: Any) -> None:
    assert REAL_GPUS
    largest = max(gpu.memory_total for gpu in REAL_GPUS)
    too_much = f"{largest // GiB + 1}GiB"
    tasks = {"report": {**REPORT, "gpu_memory": too_much}}
    async with make_harness(gpu_probe=NvmlProbe(), tasks=tasks) as h:
        job_id = await submit(h, "report")
        reason = await poll(lambda: _reason(h, job_id))
        assert reason.endswith("it can never start")
        assert too_much.removesuffix("GiB") in reason


async def test_a_preloaded_torch_module_runs_cuda_in_each_forked_job(make_harness: Any) -> None:
    # torch imported once by the fork server (no CUDA context there), CUDA initialised
    # in each forked job on the device the scheduler gave it.
    if importlib.util.find_spec("torch") is None:
        skip_for_want_of("gpu", "torch is not installed")
    task = {"function": "torch_tasks:matmul_on_gpu", "cpus": 0.1, "memory": "64MiB", "gpus": 1}
    async with make_harness(gpu_probe=NvmlProbe(), tasks={"matmul": task}) as h:
        assert h.application.runner is not None
        assert await h.application.runner.fork_server_ready(timeout=120)
        for _ in range(2):
            job_id = await submit(h, "matmul")
            done = await h.wait_for_state(job_id, "succeeded", "failed", timeout=120)
            assert done["state"] == "succeeded", done
            report = done["result"]
            assert report["device_count"] == 1 and report["sum"] == 512.0**3
            assert report["imported_by"] == report["ppid"]  # preloaded by the fork server
