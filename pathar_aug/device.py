"""Device choice and mixed precision: float32 on CPU, bf16 autocast + TF32 on CUDA."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable CUDA request is a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: this CPU has no fast bf16, so CPU stays in float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
