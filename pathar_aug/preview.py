"""PNG grids for previews, sample sheets, token-swap figures and the evaluation's sample rows."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from nnunet_integration.atomic import atomic_write_bytes


def to_rgb_tiles(x: torch.Tensor, classes: int = 2) -> list[np.ndarray]:
    """uint8 B x 3 x H x W images or {0,1} B x 1 x H x W masks (``classes`` > 2: class ids, shown
    as gray levels from black to white) -> list of H x W x 3 uint8 arrays."""
    x = x.detach().cpu()
    if x.shape[1] == 1 and classes > 2:
        x = (x.to(torch.uint8) * (255 // (classes - 1))).expand(-1, 3, -1, -1)
    elif x.shape[1] == 1:
        x = (x.to(torch.uint8) * 255).expand(-1, 3, -1, -1) if x.max() <= 1 else x.expand(-1, 3, -1, -1)
    return [t.permute(1, 2, 0).numpy().astype(np.uint8) for t in x]


def save_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2, names: list[str] | None = None,
              head: int = 110) -> Path:
    """Save rows of equally sized H x W x 3 uint8 tiles as one PNG with white gaps (written atomically).

    With ``names``, each row's name is written (wrapped, up to three lines) in a left margin of
    ``head`` pixels.
    """
    path = Path(path)
    tiles = [np.asarray(t) for row in rows for t in row]
    h, w = tiles[0].shape[:2] if tiles else (1, 1)
    left = head if names is not None else 0
    end = gap if names is not None else 0  # a named grid keeps a gap after its last row and column
    ncol = max(1, max((len(r) for r in rows), default=1))
    canvas = np.full((len(rows) * (h + gap) - gap + end, left + ncol * (w + gap) - gap + end, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            x = left + j * (w + gap)
            canvas[i * (h + gap):i * (h + gap) + h, x:x + w] = np.asarray(tile)
    image = Image.fromarray(canvas)
    if names is not None:
        draw = ImageDraw.Draw(image)
        for i, name in enumerate(names):
            # long set names ("real held-out vs real training") wrap onto up to three lines
            lines = textwrap.wrap(name, 17)[:max(1, min(3, h // 12))] or [""]
            for k, line in enumerate(lines):
                draw.text((4, i * (h + gap) + h // 2 - 6 * len(lines) + 12 * k), line, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))
    return path
