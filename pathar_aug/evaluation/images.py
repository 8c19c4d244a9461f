"""Input normalisation shared by every metric: uint8 HxWx3 images, binary / instance masks."""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Pair = tuple[np.ndarray, np.ndarray]


def as_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 (uint8, or float in [0, 1] / [0, 255]) -> HxWx3 uint8."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]  # alpha carries no appearance
    elif img.shape[-1] != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {img.shape[-1]}")
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        if img.size and img.max() <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def as_mask(mask: np.ndarray) -> np.ndarray:
    """HxW mask (binary or instance ids >0) as a 2-D integer array; HxWx1 is squeezed."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {m.shape}")
    if m.dtype == bool:
        return m.astype(np.uint8)
    if np.issubdtype(m.dtype, np.floating):
        return (m > 0.5).astype(np.uint8) if m.size and m.max() <= 1.0 else np.rint(m).astype(np.int64)
    return m


def images_to_tensor(images: Sequence[np.ndarray], size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """List of uint8 RGB images -> float tensor Nx3xHxW in [0, 1], optionally resized (antialiased).

    Images of different sizes are resized one by one so a set may mix patch sizes.
    """
    out = []
    target = (size, size) if isinstance(size, int) else size
    for image in images:
        t = torch.from_numpy(as_uint8_rgb(image)).permute(2, 0, 1).float().div_(255.0)[None]
        if target is not None and tuple(t.shape[-2:]) != tuple(target):
            t = F.interpolate(t, size=target, mode="bilinear", align_corners=False, antialias=True)
        out.append(t)
    if not out:
        raise ValueError("no images given")
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size {sorted(shapes)}; pass size= to resize them")
    return torch.cat(out).clamp_(0.0, 1.0)


def hash_arrays(arrays: Iterable[np.ndarray], extra: str = "") -> str:
    """Content hash of a list of arrays (shape, dtype and bytes), used as a cache key."""
    h = hashlib.sha256(extra.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


def batched(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))
