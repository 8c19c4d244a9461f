"""Numeric checks of the evaluation metrics: ideal on identical sets, worse when perturbed."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from scipy import linalg

from tests.conftest import block_network
from pathar_aug.evaluation import (
    compare_mask_stats,
    dice,
    fid,
    kid,
    mask_stats,
    mean_pairwise_distance,
    mmd2_unbiased,
    precision_recall,
)
from pathar_aug.evaluation.structure_stats import instance_labels, region_props


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: metrics must work fully offline."""
    block_network(monkeypatch)


def test_network_is_blocked():
    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))


@pytest.fixture
def feats():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 16)), rng


# ------------------------------------------------------------------------------------------- FID
def test_fid_zero_on_identical_and_matches_sqrtm_reference(feats):
    a, rng = feats
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(300, 16)) * 1.3 + 0.2
    # textbook formula with scipy's sqrtm
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid(a, b) == pytest.approx(ref, rel=1e-6)


def test_fid_grows_with_perturbation(feats):
    a, rng = feats
    values = [fid(a, a + rng.normal(scale=s, size=a.shape) + s) for s in (0.1, 0.5, 1.0)]
    assert 0 < values[0] < values[1] < values[2]


def test_fid_handles_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(10, 64))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(fid(a, rng.normal(size=(12, 64))))


# ------------------------------------------------------------------------------------------- KID
def test_mmd_unbiased_matches_bruteforce():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 0.3
    k = lambda u, v: (u @ v / 5 + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(7) for j in range(7) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(9) for j in range(9) if i != j])
    xy = np.mean([k(x[i], y[j]) for i in range(7) for j in range(9)])
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_kid_near_zero_for_same_distribution_and_grows(feats):
    a, rng = feats
    same = kid(a, a, n_subsets=20, subset_size=100)
    other_sample = kid(a, rng.normal(size=a.shape), n_subsets=20, subset_size=100)
    shifted = [kid(a, rng.normal(size=a.shape) + s, n_subsets=20, subset_size=100).mean for s in (0.3, 0.6, 1.2)]
    assert abs(same.mean) < 0.05 and abs(other_sample.mean) < 0.05
    assert shifted[0] > 3 * abs(other_sample.mean)
    assert shifted[0] < shifted[1] < shifted[2]
    assert same.subset_size == 100 and same.n_subsets == 20 and same.std >= 0


def test_kid_subset_size_is_capped_by_set_size(feats):
    a, _ = feats
    assert kid(a[:30], a[:50], n_subsets=3, subset_size=1000).subset_size == 30


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_ideal_on_identical(feats):
    a, _ = feats
    pr = precision_recall(a, a, k=3)
    assert (pr.precision, pr.recall, pr.k) == (1.0, 1.0, 3)


def test_precision_recall_drop_when_shifted_and_recall_drops_on_collapse(feats):
    a, rng = feats
    shifted = precision_recall(a, rng.normal(size=a.shape) + 3.0)
    assert shifted.precision < 0.3 and shifted.recall < 0.3
    # mode collapse: every sample near one real point -> still precise, covers little
    collapsed = a[:1] + rng.normal(scale=0.01, size=a.shape)
    c = precision_recall(a, collapsed)
    assert c.precision > 0.9 and c.recall < 0.1


# ---------------------------------------------------------------------------------- diversity
def test_mean_pairwise_distance():
    rng = np.random.default_rng(3)
    assert mean_pairwise_distance(np.ones((20, 4))) == pytest.approx(0.0, abs=1e-6)
    small = mean_pairwise_distance(rng.normal(scale=0.1, size=(50, 4)))
    large = mean_pairwise_distance(rng.normal(scale=1.0, size=(50, 4)))
    assert 0 < small < large
    pts = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_distance(pts) == pytest.approx(5.0)
    assert np.isnan(mean_pairwise_distance(pts[:1]))


# ------------------------------------------------------------------------------ structure stats
def disk_mask(size: int, centres, radii, axes=None) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    m = np.zeros((size, size), np.uint8)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii)):
        ay, ax = (r, r) if axes is None else axes[i]
        m[((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1] = 1
    return m


def random_masks(n: int, rng, radius=(3, 6), count=(2, 7), size=64) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        k = rng.integers(*count)
        centres = rng.integers(8, size - 8, size=(k, 2))
        out.append(disk_mask(size, centres, rng.integers(*radius, size=k)))
    return out


def test_region_props_count_area_eccentricity():
    m = disk_mask(64, [(16, 16), (45, 40)], [6, 0], axes=[(6, 6), (4, 12)])
    labels, ids = instance_labels(m)
    area, ecc = region_props(labels, ids)
    assert len(ids) == 2
    assert area.sum() == m.sum()
    assert ecc[0] < 0.15  # disk
    assert ecc[1] == pytest.approx(np.sqrt(1 - (4 / 12) ** 2), abs=0.03)  # ellipse 4 x 12


def test_eccentricity_agrees_with_skimage():
    measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(4)
    m = random_masks(1, rng, radius=(2, 8), count=(6, 9))[0]
    m[5:8, 5:30] = 1  # elongated component
    labels, ids = instance_labels(m)
    _, ecc = region_props(labels, ids)
    ref = {p.label: p.eccentricity for p in measure.regionprops(labels)}
    assert np.allclose(ecc, [ref[i] for i in ids], atol=1e-6)


def test_instance_id_masks_keep_touching_nuclei_apart():
    m = np.zeros((20, 20), np.int32)
    m[5:10, 2:8] = 1
    m[5:10, 8:14] = 2  # touches instance 1
    labels, ids = instance_labels(m)
    assert list(ids) == [1, 2]
    assert mask_stats([m]).nuclei_per_patch[0] == 2
    assert mask_stats([(m > 0).astype(np.uint8)]).nuclei_per_patch[0] == 1


def test_mask_stats_identical_zero_and_perturbed_grow():
    rng = np.random.default_rng(5)
    real = random_masks(30, rng)
    base = mask_stats(real)
    cmp = compare_mask_stats(base, mask_stats(real))
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in cmp.values()), cmp

    bigger = compare_mask_stats(base, mask_stats(random_masks(30, np.random.default_rng(6), radius=(7, 10))))
    similar = compare_mask_stats(base, mask_stats(random_masks(30, np.random.default_rng(6))))
    assert bigger["area_w1_px"] > 3 * similar["area_w1_px"]
    assert bigger["foreground_fraction_w1"] > similar["foreground_fraction_w1"]

    crowded = compare_mask_stats(base, mask_stats(random_masks(30, np.random.default_rng(6), count=(12, 20))))
    assert crowded["nuclei_per_patch_w1"] > 2 * similar["nuclei_per_patch_w1"]

    elongated = [disk_mask(64, [(20, 20), (40, 40)], [0, 0], axes=[(3, 10), (3, 10)]) for _ in range(30)]
    assert compare_mask_stats(base, mask_stats(elongated))["eccentricity_w1"] > 0.5

    degenerate = [np.zeros((64, 64), np.uint8)] * 10 + [np.ones((64, 64), np.uint8)] * 5
    d_stats = mask_stats(degenerate)
    assert d_stats.empty_share == pytest.approx(10 / 15) and d_stats.full_share == pytest.approx(5 / 15)
    gaps = compare_mask_stats(base, d_stats)
    assert gaps["empty_share_gap"] == pytest.approx(10 / 15) and gaps["full_share_gap"] == pytest.approx(5 / 15)


def test_all_empty_generated_masks_give_nan_not_crash():
    rng = np.random.default_rng(7)
    cmp = compare_mask_stats(mask_stats(random_masks(5, rng)), mask_stats([np.zeros((64, 64), np.uint8)] * 4))
    assert np.isnan(cmp["area_w1_px"]) and cmp["empty_share_gap"] == 1.0


def test_dice():
    a = np.zeros((8, 8), np.uint8)
    assert dice(a, a) == 1.0
    b = a.copy()
    b[:4] = 1
    assert dice(b, b) == 1.0 and dice(b, a) == 0.0
    c = np.zeros_like(a)
    c[:2] = 1
    assert dice(b, c) == pytest.approx(2 * 16 / (32 + 16))


def test_markdown_skips_a_set_that_is_empty_for_one_label():
    # the filtered set can be empty for a label whose candidates all fail the filter
    import pandas as pd

    from pathar_aug.evaluation.report import COLUMNS, to_markdown

    rows = [("a", "model", "masks", "empty_share", 0.1, 8, 8, "0"),
            ("a", "model, filtered", "masks", "empty_share", 0.0, 8, 4, "0"),
            ("b", "model", "masks", "empty_share", 0.3, 8, 8, "0")]
    text = to_markdown(pd.DataFrame(rows, columns=COLUMNS), {})
    assert "| b | model | 8 | 8 |" in text and "| b | model, filtered" not in text
