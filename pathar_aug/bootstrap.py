"""Paired bootstrap intervals for differences between study groups.

Every group of the Dice study is scored on the same validation tiles, and group k of seed s shares
its real tiles with group I of seed s, so a group's difference to group I is paired by (seed, tile).
The interval resamples both levels with replacement - seeds, then tiles - and takes percentiles of
the mean paired difference. Resampling seeds carries the run-to-run variance of nnU-Net training
into the interval; resampling tiles carries the variance of the validation set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(differences: Sequence[np.ndarray], n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> Interval:
    """Interval of the mean paired difference, averaged over strata.

    ``differences``: one array per stratum (e.g. per label), each seeds x tiles of paired differences
    (group minus reference). Each resample draws the seeds once (shared by all strata: a seed is one
    nnU-Net run over every label) and the tiles of each stratum on their own; the statistic is the
    mean over strata of each stratum's mean difference.
    """
    arrays = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in differences]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("paired_bootstrap needs at least one non-empty stratum")
    n_seeds = arrays[0].shape[0]
    if any(a.shape[0] != n_seeds for a in arrays):
        raise ValueError("every stratum needs the same number of seeds")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    stats = np.zeros(n_resamples)
    for a in arrays:
        tiles = rng.integers(0, a.shape[1], size=(n_resamples, a.shape[1]))
        # mean over the drawn seeds of the mean over the drawn tiles (every seed sees the same tile draw)
        per_seed = a[:, tiles].mean(axis=2)  # seeds x resamples
        stats += np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)
    stats /= len(arrays)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    mean = float(np.mean([a.mean() for a in arrays]))
    return Interval(mean, float(low), float(high))
