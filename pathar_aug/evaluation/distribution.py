"""Distances between a real and a generated feature set: FID, KID, improved precision / recall.

All functions take two float arrays of shape (N, D) in the same feature space; which feature space
that is (and so what the number may be called) is the caller's business, see ``features.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check(a: np.ndarray, b: np.ndarray, min_n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (N, D) arrays with the same D, got {a.shape} and {b.shape}")
    if len(a) < min_n or len(b) < min_n:
        raise ValueError(f"need at least {min_n} samples per set, got {len(a)} and {len(b)}")
    return a, b


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets (ideal 0).

    tr sqrt(S1 S2) is computed as tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix, so it needs
    only eigendecompositions: no complex parts or ill-conditioned sqrtm when N < D (covariances are
    then rank deficient, which biases FID upwards; always report N next to it).
    """
    a, b = _check(real, generated)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    root_a = _sqrtm_psd(s_a)
    m = root_a @ s_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_covmean)
    return max(value, 0.0)


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, coef0: float) -> np.ndarray:
    # gamma = 1/D as in Binkowski et al. 2018 (and torch-fidelity / clean-fid)
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (one KID subset)."""
    m, n = len(x), len(y)
    kxx = _poly_kernel(x, x, degree, coef0)
    kyy = _poly_kernel(y, y, degree, coef0)
    kxy = _poly_kernel(x, y, degree, coef0)
    term_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    term_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subset_size: int
    n_subsets: int


def kid(
    real: np.ndarray,
    generated: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> KIDResult:
    """Kernel Inception Distance: mean (and std) over random subsets of the unbiased MMD^2 (ideal 0).

    Unbiased, so it can be slightly negative for two samples of one distribution; it does not
    need N > D, which is why it is the better number for small medical sets.
    """
    a, b = _check(real, generated)
    size = int(min(subset_size, len(a), len(b)))
    if size < 2:
        raise ValueError("KID needs subsets of at least 2 samples")
    rng = np.random.default_rng(seed)
    values = np.empty(n_subsets)
    for i in range(n_subsets):
        ia = rng.choice(len(a), size, replace=False)
        ib = rng.choice(len(b), size, replace=False)
        values[i] = mmd2_unbiased(a[ia], b[ib], degree, coef0)
    return KIDResult(float(values.mean()), float(values.std()), size, n_subsets)


def pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(a), len(b)), clipped at 0 against rounding."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.clip(d, 0.0, None)


def knn_radii(features: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance of every sample to its k-th nearest other sample (the manifold ball radius)."""
    f = np.asarray(features, dtype=np.float64)
    k = min(k, len(f) - 1)
    if k < 1:
        raise ValueError("need at least 2 samples for k-NN radii")
    radii = np.empty(len(f))
    for s in range(0, len(f), chunk):
        d = pairwise_sq_distances(f[s : s + chunk], f)
        # index k of the sorted row: index 0 is the sample itself (distance 0)
        radii[s : s + chunk] = np.sqrt(np.partition(d, k, axis=1)[:, k])
    return radii


def manifold_coverage(reference: np.ndarray, radii: np.ndarray, query: np.ndarray, chunk: int = 1024) -> float:
    """Share of query samples inside at least one reference k-NN ball."""
    q = np.asarray(query, dtype=np.float64)
    r2 = (np.asarray(radii, dtype=np.float64) ** 2)[None, :]
    inside = 0
    for s in range(0, len(q), chunk):
        d = pairwise_sq_distances(q[s : s + chunk], reference)
        # tiny relative slack so a query equal to a reference point with radius 0 still counts
        inside += int((d <= r2 * (1 + 1e-9) + 1e-12).any(axis=1).sum())
    return inside / len(q)


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019), ideal 1 and 1.

    Precision: share of generated samples inside the real k-NN manifold (fidelity).
    Recall: share of real samples inside the generated k-NN manifold (coverage / diversity).
    """
    a, b = _check(real, generated, min_n=2)
    k_eff = min(k, len(a) - 1, len(b) - 1)
    precision = manifold_coverage(a, knn_radii(a, k_eff), b)
    recall = manifold_coverage(b, knn_radii(b, k_eff), a)
    return PrecisionRecall(precision, recall, k_eff)
