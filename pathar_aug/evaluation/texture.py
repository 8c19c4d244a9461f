"""How hard a pair is to segment: fine detail, background texture and nucleus contrast.

A generated pair can agree with its mask and still teach a segmenter the wrong thing when its
image is easier than real ones: smooth, with a flat background and nuclei far darker (or brighter)
than it. Measured on DSB2018, the synthetic histology tiles had half the real tiles' fine detail and
twice their nucleus contrast, and nnU-Net trained with them lost recall on real histology (README,
"Why histology loses"). These figures read that gap on any set of pairs; all are on the grey image
(the mean of the RGB channels), in grey levels 0-255:

- ``fine_detail``: mean |g - G_sigma(g)|, the energy a Gaussian blur of ``sigma`` = 1 px removes
  (texture, noise, sharp edges); a blurry decoder drives it down.
- ``background_std``: the spread of grey levels away from nuclei (pixels more than ``margin`` px
  from the mask), per tile; a flat background makes every dark blob a nucleus.
- ``contrast``: |mean grey in nuclei - mean grey of the background| / background_std, per tile
  with at least ``min_nucleus_px`` nucleus and 100 background pixels: how many background
  standard deviations separate a nucleus from its surroundings.
Per-set values are medians over tiles (``fine_detail`` the mean).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage

from .images import Pair, as_mask, as_uint8_rgb


@dataclass(frozen=True)
class TextureFigures:
    tiles: int
    fine_detail: float
    background_std: float
    contrast: float
    contrast_tiles: int  # tiles with enough nucleus and background to take a contrast

    def to_json(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def grey(image: np.ndarray) -> np.ndarray:
    """uint8 RGB (or grey) image -> float grey levels 0-255."""
    return as_uint8_rgb(image).astype(np.float64).mean(axis=-1)


def fine_detail(image: np.ndarray, sigma: float = 1.0) -> float:
    g = grey(image)
    return float(np.abs(g - ndimage.gaussian_filter(g, sigma)).mean())


def tile_contrast(image: np.ndarray, mask: np.ndarray, margin: int = 3,
                  min_nucleus_px: int = 20) -> tuple[float, float | None]:
    """(background std, contrast or None when the tile has too little nucleus or background)."""
    g, m = grey(image), as_mask(mask) > 0
    background = g[~ndimage.binary_dilation(m, iterations=margin)] if m.any() else g.ravel()
    spread = float(background.std()) if background.size else float("nan")
    if m.sum() < min_nucleus_px or background.size < 100:
        return spread, None
    return spread, abs(float(g[m].mean()) - float(background.mean())) / (spread + 1e-6)


def texture_figures(pairs: Iterable[Pair], margin: int = 3, min_nucleus_px: int = 20) -> TextureFigures:
    """The figures of a set of (image, mask) pairs (module doc)."""
    details, spreads, contrasts = [], [], []
    for image, mask in pairs:
        details.append(fine_detail(image))
        spread, contrast = tile_contrast(image, mask, margin, min_nucleus_px)
        spreads.append(spread)
        if contrast is not None:
            contrasts.append(contrast)
    if not details:
        raise ValueError("no pairs given")
    return TextureFigures(tiles=len(details), fine_detail=float(np.mean(details)),
                          background_std=float(np.nanmedian(spreads)),
                          contrast=float(np.median(contrasts)) if contrasts else float("nan"),
                          contrast_tiles=len(contrasts))
