"""A task module that imports PyTorch at its top, as GPU task code usually does: the fork
server preloads it, so every job process starts with torch imported (test_gpu_nvml)."""

from __future__ import annotations

import os
from typing import Any

import torch  # type: ignore[import-not-found, unused-ignore]

IMPORTED_BY = os.getpid()


def matmul_on_gpu() -> dict[str, Any]:
    ones = torch.ones(512, 512, device="cuda")
    return {
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device_count": torch.cuda.device_count(),
        "sum": float((ones @ ones).sum().item()),
        "imported_by": IMPORTED_BY,
        "ppid": os.getppid(),
    }
