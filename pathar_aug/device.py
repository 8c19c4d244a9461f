"""Device choice and mixed precision: float32 on CPU, bf16 autocast + TF32 on CUDA."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an unavailable CUDA request is a clear error.

    On CUDA, float32 matmuls and convolutions run on TF32 tensor cores (``enable_tf32``)."""
    if name in (None, "", "auto"):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        enable_tf32()
    return device


def enable_tf32() -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (what bf16 autocast leaves in float32)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:  # older torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA only: this CPU has no fast bf16, so CPU stays in float32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on ``device``: through pinned memory and an asynchronous copy on CUDA."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def compile_modules(*modules: torch.nn.Module) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``): its state dict, and so the
    checkpoints, keep their keys. For training with ``--compile`` (CUDA; on a CPU it needs a C++
    compiler and pays minutes of compilation for little)."""
    for module in modules:
        module.compile()


def user_device(name: str) -> torch.device:
    """``--device`` as a user typed it: auto, cpu, cuda or cuda:N of this machine, else a clear error."""
    try:
        device = resolve_device(name)
    except RuntimeError:  # torch's own message lists every backend it was built to know
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not a device this tool runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         "numbered from 0")
    return device
