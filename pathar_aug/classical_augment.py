"""The classical baseline a user tries before a generative model: offline augmented copies.

Each copy of a real patch gets, in this order,
- one of the 8 dihedral transforms (quarter turns and a flip), the same for image and mask,
- an elastic deformation (Simard et al. 2003): a smooth random displacement field, Gaussian-smoothed
  white noise rescaled to ``elastic_px`` pixels of standard deviation; the image is resampled
  bilinearly, the mask with nearest neighbour so it stays binary,
- colour and brightness jitter on the image only: per-channel gain (stain strength), contrast around
  the mean, a brightness offset and a gamma curve.

nnU-Net augments internally as well (rotation, scaling, mirroring, noise, blur, brightness, contrast,
gamma, low resolution); what the offline copies add on top is mainly the elastic deformation and
the per-channel colour change, and a larger number of distinct cases per epoch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates


@dataclass(frozen=True)
class ClassicalAugment:
    """Strengths of the offline augmentation; ``describe()`` is written into the benchmark report."""

    elastic_px: float = 0.03  # displacement standard deviation, as a fraction of the patch edge
    elastic_smooth: float = 0.08  # Gaussian sigma of the displacement field, fraction of the patch edge
    channel_gain: float = 0.10  # each channel scaled by U(1 - g, 1 + g)
    contrast: float = 0.20  # (x - mean) scaled by U(1 - c, 1 + c)
    brightness: float = 0.08  # offset U(-b, b) x 255
    gamma: float = 0.20  # exponent exp(U(-log(1 + g), log(1 + g)))

    def describe(self) -> str:
        return ("the real patches copied with a random dihedral transform, elastic deformation "
                f"(displacement s.d. {self.elastic_px:g} x patch, smoothing {self.elastic_smooth:g} x patch) "
                f"and colour/brightness jitter (channel gain +-{self.channel_gain:g}, contrast +-{self.contrast:g}, "
                f"brightness +-{self.brightness:g}, gamma x/ {1 + self.gamma:g})")

    def to_json(self) -> dict:
        return asdict(self)


def dihedral_np(x: np.ndarray, k: int) -> np.ndarray:
    """The k-th dihedral transform (k in 0..7) of an H x W (x C) array: k % 4 quarter turns, then a
    left-right flip when k >= 4 (the same order as ``patches.dihedral``)."""
    x = np.rot90(x, k % 4, axes=(0, 1))
    return np.ascontiguousarray(x[:, ::-1] if k >= 4 else x)


def elastic_deform(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, displacement_px: float,
                   smooth_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Warp an H x W x 3 uint8 image and its H x W mask with one smooth random displacement field."""
    h, w = mask.shape
    fields = []
    for _ in range(2):
        f = gaussian_filter(rng.standard_normal((h, w)), smooth_px, mode="reflect")
        std = f.std()
        fields.append(f / std * displacement_px if std > 0 else f)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    coords = np.stack([yy + fields[0], xx + fields[1]])
    warped = np.stack([map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="reflect")
                       for c in range(image.shape[2])], axis=-1)
    warped_mask = map_coordinates(mask.astype(np.uint8), coords, order=0, mode="reflect")
    return np.clip(warped + 0.5, 0, 255).astype(np.uint8), warped_mask.astype(mask.dtype)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, aug: ClassicalAugment) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(1 - aug.channel_gain, 1 + aug.channel_gain, size=(1, 1, x.shape[2]))
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    x = x + rng.uniform(-aug.brightness, aug.brightness)
    x = np.clip(x, 0.0, 1.0) ** np.exp(rng.uniform(-np.log1p(aug.gamma), np.log1p(aug.gamma)))
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 aug: ClassicalAugment = ClassicalAugment()) -> tuple[np.ndarray, np.ndarray]:
    """One augmented copy of an (H x W x 3 uint8 image, H x W {0,1} mask) pair."""
    k = int(rng.integers(0, 8))
    image, mask = dihedral_np(image, k), dihedral_np(mask, k)
    edge = min(mask.shape)
    if aug.elastic_px > 0:
        image, mask = elastic_deform(image, mask, rng, aug.elastic_px * edge, max(1.0, aug.elastic_smooth * edge))
    return colour_jitter(image, rng, aug), mask


def expand(images: list[np.ndarray], masks: list[np.ndarray], n: int, seed: int,
           aug: ClassicalAugment = ClassicalAugment(), start: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Augmented copies ``start .. n-1`` of the given pairs, cycling through them in order (copy i
    comes from pair ``i % len(images)``); copy i is seeded by (seed, i) alone, so any range of copies
    can be made on its own and is the same as in one long call."""
    if not images or len(images) != len(masks):
        raise ValueError("expand needs as many masks as images, and at least one pair")
    out = []
    for i in range(start, n):
        rng = np.random.default_rng([seed, i])
        out.append(augment_pair(images[i % len(images)], masks[i % len(images)], rng, aug))
    return out
