"""Morphology of generated masks against real masks.

Nuclei are connected components of the foreground (8-connectivity), or the given instance ids when
a mask carries more than one positive id. Eccentricity comes from the second central moments of a
component's pixel coordinates (as skimage.measure.regionprops defines it: 0 for a disk, ->1 for a
line). Distributions are compared with the 1-D Wasserstein distance, which is in the unit of the
quantity (nuclei, pixels) and 0 when the distributions agree. Areas are in pixels, so real and
generated masks must share a resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from .images import as_mask

_EIGHT = np.ones((3, 3), dtype=bool)


def instance_labels(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label image, ids of its instances) for a binary or instance-id mask."""
    m = as_mask(mask)
    ids = np.unique(m[m > 0])
    if len(ids) > 1:
        return m.astype(np.int64), ids.astype(np.int64)
    labels, n = ndimage.label(m > 0, structure=_EIGHT)
    return labels, np.arange(1, n + 1)


def region_props(labels: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (pixels) and second-moment eccentricity of each instance, vectorised over ids."""
    if len(ids) == 0:
        return np.zeros(0), np.zeros(0)
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    area = ndimage.sum_labels(np.ones(labels.shape), labels, ids)
    my = ndimage.sum_labels(yy, labels, ids) / area
    mx = ndimage.sum_labels(xx, labels, ids) / area
    syy = ndimage.sum_labels(yy * yy, labels, ids) / area - my**2
    sxx = ndimage.sum_labels(xx * xx, labels, ids) / area - mx**2
    sxy = ndimage.sum_labels(xx * yy, labels, ids) / area - mx * my
    half_tr = (sxx + syy) / 2
    root = np.sqrt(np.clip(((sxx - syy) / 2) ** 2 + sxy**2, 0, None))
    l1, l2 = half_tr + root, np.clip(half_tr - root, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 1e-12, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    return area, ecc


@dataclass
class MaskStats:
    """Per-set morphology: one entry per mask (counts, fractions) or per nucleus (area, ecc)."""

    nuclei_per_patch: np.ndarray
    areas: np.ndarray
    eccentricities: np.ndarray
    foreground_fraction: np.ndarray
    full_threshold: float

    @property
    def empty_share(self) -> float:
        return float((self.foreground_fraction == 0).mean()) if len(self.foreground_fraction) else float("nan")

    @property
    def full_share(self) -> float:
        ff = self.foreground_fraction
        return float((ff >= self.full_threshold).mean()) if len(ff) else float("nan")

    def summary(self) -> dict[str, float]:
        """Descriptive values of one set (the real set's are the reference for a generated one)."""

        def mean(a: np.ndarray) -> float:
            return float(a.mean()) if len(a) else float("nan")

        return {
            "nuclei_per_patch_mean": mean(self.nuclei_per_patch),
            "area_mean_px": mean(self.areas),
            "eccentricity_mean": mean(self.eccentricities),
            "foreground_fraction_mean": mean(self.foreground_fraction),
            "empty_share": self.empty_share,
            "full_share": self.full_share,
        }


def mask_stats(masks: Sequence[np.ndarray], min_area: int = 1, full_threshold: float = 0.98) -> MaskStats:
    """Morphology of a set of masks; components smaller than ``min_area`` pixels are ignored."""
    counts, areas, eccs, fg = [], [], [], []
    for mask in masks:
        m = as_mask(mask)
        fg.append(float((m > 0).mean()) if m.size else 0.0)
        labels, ids = instance_labels(m)
        area, ecc = region_props(labels, ids)
        keep = area >= min_area
        counts.append(int(keep.sum()))
        areas.append(area[keep])
        eccs.append(ecc[keep])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    return MaskStats(
        np.asarray(counts, dtype=np.float64), cat(areas), cat(eccs), np.asarray(fg), full_threshold
    )


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    # undefined (NaN) when a side has no values, e.g. a generator that only makes empty masks
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def compare_mask_stats(real: MaskStats, generated: MaskStats) -> dict[str, float]:
    """1-D Wasserstein distances real vs generated (ideal 0) and gaps in empty / full shares."""
    return {
        "nuclei_per_patch_w1": _w1(real.nuclei_per_patch, generated.nuclei_per_patch),
        "area_w1_px": _w1(real.areas, generated.areas),
        "eccentricity_w1": _w1(real.eccentricities, generated.eccentricities),
        "foreground_fraction_w1": _w1(real.foreground_fraction, generated.foreground_fraction),
        "empty_share_gap": abs(generated.empty_share - real.empty_share),
        "full_share_gap": abs(generated.full_share - real.full_share),
    }
