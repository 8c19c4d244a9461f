"""PNG grids for previews, sample sheets and token-swap figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_rgb_tiles(x: torch.Tensor) -> list[np.ndarray]:
    """uint8 B x 3 x H x W images or {0,1} B x 1 x H x W masks -> list of H x W x 3 uint8 arrays."""
    x = x.detach().cpu()
    if x.shape[1] == 1:
        x = (x.to(torch.uint8) * 255).expand(-1, 3, -1, -1) if x.max() <= 1 else x.expand(-1, 3, -1, -1)
    return [t.permute(1, 2, 0).numpy().astype(np.uint8) for t in x]


def save_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2) -> Path:
    """Save rows of equally sized H x W x 3 uint8 tiles as one PNG with white gaps."""
    path = Path(path)
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) - gap, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(canvas).save(tmp)
    tmp.replace(path)
    return path
