"""The Dice study's statistics: AJI and PQ on hand-made instance maps, the paired bootstrap on cases
with a known answer, and the summary / markdown built from fold results."""
from __future__ import annotations

import numpy as np
import pytest

from pathar_aug.study import AVERAGE, BenchmarkSettings, Plan, markdown_table, summarize
from pathar_aug.bootstrap import paired_bootstrap
from pathar_aug.instance_metrics import (
    aggregated_jaccard, binary_dice, instances_from_binary, panoptic_quality, tile_scores,
)


def squares(shape, boxes) -> np.ndarray:
    """An instance map with object i+1 filling boxes[i] = (y0, y1, x0, x1)."""
    out = np.zeros(shape, np.int32)
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        out[y0:y1, x0:x1] = i + 1
    return out


def test_perfect_prediction_scores_one():
    gt = squares((10, 10), [(0, 3, 0, 3), (5, 9, 5, 9)])
    assert aggregated_jaccard(gt, gt) == 1.0 and panoptic_quality(gt, gt) == 1.0
    relabelled = np.where(gt == 1, 7, np.where(gt == 2, 3, 0))  # ids are arbitrary
    assert aggregated_jaccard(gt, relabelled) == 1.0 and panoptic_quality(gt, relabelled) == 1.0


def test_aji_and_pq_hand_computed():
    # true: A = 2x2 (4 px), B = 4x4 (16 px); predicted: P = 2x3 covering A (6 px), B missed
    gt = squares((8, 8), [(0, 2, 0, 2), (4, 8, 4, 8)])
    pred = squares((8, 8), [(0, 2, 0, 3)])
    # AJI: C = |A∩P| = 4; U = |A∪P| + |B| = 6 + 16
    assert aggregated_jaccard(gt, pred) == pytest.approx(4 / 22)
    # PQ: IoU(A, P) = 4/6 > 0.5 -> TP 1, FN 1 (B), FP 0 -> (4/6) / (1 + 0.5)
    assert panoptic_quality(gt, pred) == pytest.approx((4 / 6) / 1.5)


def test_merged_nuclei_cost_instances_not_dice():
    # two touching true nuclei predicted as one blob: Dice is perfect, the instance metrics are not
    gt = squares((6, 8), [(1, 5, 0, 4), (1, 5, 4, 8)])
    pred = (gt > 0).astype(np.uint8)
    scores = tile_scores(pred, gt)
    assert scores["dice"] == 1.0
    # one predicted object (32 px); each true one (16 px) has IoU 0.5 with it -> no PQ match
    assert scores["pq"] == 0.0
    # AJI: both true objects pick the blob: C = 16 + 16, U = 32 + 32
    assert scores["aji"] == pytest.approx(0.5)


def test_unmatched_prediction_and_pq_threshold():
    gt = squares((10, 10), [(0, 4, 0, 4)])  # 16 px
    pred = squares((10, 10), [(0, 4, 0, 2), (7, 9, 7, 9)])  # 8 px inside gt (IoU 0.5), 4 px stray
    # IoU exactly 0.5 is not a match: TP 0, FP 2, FN 1
    assert panoptic_quality(gt, pred) == 0.0
    # AJI: C = 8, U = 16 (gt ∪ first) + 4 (stray, unmatched)
    assert aggregated_jaccard(gt, pred) == pytest.approx(8 / 20)


def test_empty_tiles():
    empty = np.zeros((5, 5), np.int32)
    one = squares((5, 5), [(1, 3, 1, 3)])
    assert aggregated_jaccard(empty, empty) == 1.0 and panoptic_quality(empty, empty) == 1.0
    assert aggregated_jaccard(one, empty) == 0.0 and panoptic_quality(empty, one) == 0.0
    assert binary_dice(empty, empty) == 1.0 and binary_dice(one, empty) == 0.0


def test_instances_from_binary_uses_4_connectivity():
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.uint8)  # diagonal neighbours: two objects
    labels = instances_from_binary(mask)
    assert labels.max() == 2 and labels[1, 1] == labels[1, 2] != labels[0, 0]


def test_bootstrap_of_a_constant_difference_is_that_constant():
    interval = paired_bootstrap([np.full((3, 40), 0.07)], n_resamples=500)
    assert interval.mean == pytest.approx(0.07)
    assert interval.low == pytest.approx(0.07) and interval.high == pytest.approx(0.07)
    assert interval.excludes_zero


def test_bootstrap_matches_the_normal_interval_of_a_mean():
    # one seed, 2,000 tiles with s.d. 1: the 95 % interval of the mean is about mean ± 1.96 / sqrt(2000)
    rng = np.random.default_rng(3)
    d = rng.normal(0.0, 1.0, (1, 2000))
    interval = paired_bootstrap([d], n_resamples=4000, seed=1)
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert interval.mean == pytest.approx(d.mean())
    assert interval.low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert interval.high == pytest.approx(d.mean() + half, abs=0.15 * half)


def test_bootstrap_carries_the_variance_between_seeds():
    # every tile agrees within a seed, but the seeds disagree in sign: the interval must span 0
    d = np.array([[0.2] * 30, [-0.1] * 30, [0.05] * 30])
    interval = paired_bootstrap([d], n_resamples=2000)
    assert interval.low < 0 < interval.high and not interval.excludes_zero
    # averaging strata: (0.1 + 0.3) / 2
    assert paired_bootstrap([np.full((2, 5), 0.1), np.full((2, 9), 0.3)]).mean == pytest.approx(0.2)


def test_bootstrap_refuses_mismatched_seeds():
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_bootstrap([np.zeros((2, 3)), np.zeros((3, 3))])


def fold_result(group, seed, plan, values):
    """A fold result as train_and_evaluate writes it, every tile of a label scoring ``values[label]``."""
    out = {"fold": 0, "seed": seed, "group": group.to_json(), "pooled_dice_per_label": {}}
    for metric in ("dice", "aji", "pq"):
        out[f"{metric}_per_case"] = {c: values[label] for label in plan.labels for c in plan.val[label]}
        out[f"{metric}_per_label"] = {label: values[label] for label in plan.labels}
    out["pooled_dice_per_label"] = {label: values[label] for label in plan.labels}
    return out


def test_summary_marks_the_deltas_whose_interval_excludes_zero():
    settings = BenchmarkSettings(real=4, synthetic=(0, 8), synthetic_only=0, extra_rows="none", seeds=2,
                                 bootstrap=200)
    g1, g2 = settings.groups
    plan = Plan(labels=["a", "b"], val={"a": ["a1", "a2", "a3"], "b": ["b1", "b2"]},
                val_sources={"a": ["x"], "b": ["y"]}, real_train=[], synthetic={}, folds=[])
    results = {}
    for seed in range(2):
        results[f"I{seed}"] = fold_result(g1, seed, plan, {"a": 0.5, "b": 0.6})
        # group II: better on a in both seeds, on b better in one seed and worse in the other
        results[f"II{seed}"] = fold_result(g2, seed, plan, {"a": 0.7, "b": 0.7 if seed == 0 else 0.4})
    rows = summarize(settings, plan, results)
    by = {(r["group"], r["label"]): r for r in rows}
    assert by[("II", "a")]["delta_vs_I"] == pytest.approx(0.2)
    assert by[("II", "a")]["delta_ci_low"] == pytest.approx(0.2) and by[("II", "a")]["aji_delta_vs_I"] == pytest.approx(0.2)
    assert by[("II", "b")]["dice"] == pytest.approx(0.55) and by[("II", "b")]["dice_sd"] == pytest.approx(0.2121, abs=1e-4)
    assert by[("II", "b")]["delta_ci_low"] < 0 < by[("II", "b")]["delta_ci_high"]
    assert by[("II", AVERAGE)]["delta_vs_I"] == pytest.approx((0.2 - 0.05) / 2)
    assert by[("I", "a")]["delta_vs_I"] == 0.0 and by[("II", "a")]["seeds"] == 2
    meta = {"schedule_text": "x", "patch": 32, "plans_text": "p", "generator_text": "g", "instances_text": "i",
            "sampling_text": "s", "filter_text": "f"}
    table = markdown_table(settings, plan, rows, meta)
    assert "(**+0.200 [+0.200, +0.200]**)" in table  # excludes 0: bold
    assert "(-0.050 [" in table and "(**-0.050" not in table  # spans 0: plain
    assert "## Aggregated Jaccard index (AJI)" in table and "## Panoptic quality (PQ)" in table


def test_convergence_flags_a_group_still_learning_at_the_end_of_its_schedule():
    from pathar_aug.study.report import STILL_LEARNING, convergence, convergence_markdown

    def point(group, key, seed, epoch, label, dice):
        return {"group": group, "group_key": key, "seed": seed, "epoch": epoch, "label": label, "dice": dice}

    curve = []
    for seed in (0, 1):  # group I: flat over the last quarter in both seeds
        for epoch, dice in ((20, 0.80), (30, 0.840), (40, 0.845 + 0.002 * seed)):
            curve += [point("I", "r30", seed, epoch, label, dice) for label in ("a", "b")]
    for epoch, (da, db) in ((20, (0.6, 0.7)), (30, (0.70, 0.85)), (40, (0.78, 0.85))):  # II: a still rising
        curve += [point("II", "r30-f200", 0, epoch, "a", da), point("II", "r30-f200", 0, epoch, "b", db)]
    curve += [point("III", "r30-g9", 0, 40, "a", 0.5), point("III", "r30-g9", 0, 40, "b", 0.5)]  # one point: no gain
    rows = convergence(curve, ["a", "b"])
    assert [r["group"] for r in rows] == ["I", "II"]
    first, second = rows
    assert first["seeds"] == [0, 1] and first["epochs"] == [30, 40] and first["still_learning"] == []
    assert first["gain"]["a"] == pytest.approx(0.006) and first["dice"]["a"] == [0.84, 0.846]
    assert second["gain"]["a"] == pytest.approx(0.08) and second["gain"]["a"] > STILL_LEARNING
    assert second["still_learning"] == ["a"]
    assert second["gain"][AVERAGE] == pytest.approx(0.04) and second["gain"]["b"] == pytest.approx(0.0)
    text = "\n".join(convergence_markdown(rows, ["a", "b"]))
    assert "**0.700 → 0.780 (+0.080)**" in text and "0.840 → 0.846 (+0.006)" in text
    assert "**0.840 → 0.846" not in text and "Group(s) II still learning" in text
    assert convergence_markdown([], ["a"]) == []


def test_two_studies_pair_when_only_the_generator_differs():
    from benchmarks.dice_compare import check_pairable, compare, shared_reference

    def study(model: str, val: int, dice_i: float, dice_f: float, group_i: int = 0) -> dict:
        tiles = ["t0", "t1", "t2"]
        folds, per_case = {}, {}
        for seed in (0, 1):
            for key, dice in (("r30", dice_i), ("r30-f200", dice_f)):
                name = f"{key}-seed{seed}"
                # a fold's checkpoint signature; equal for group I where one study took the other's
                folds[name] = {"group": {"key": key}, "seed": seed,
                               "checkpoint": [group_i if key == "r30" else hash(model), seed]}
                per_case[name] = {t: dice + 0.01 * i for i, t in enumerate(tiles)}
        return {"settings": {"model": model, "val": val, "filter_order": "draw"},
                "validation": {"a": {"cases": tiles}}, "folds": folds,
                **{f"{m}_per_case": per_case for m in ("dice", "aji", "pq")}}

    a, b = study("gen-a", 50, 0.80, 0.75), study("gen-b", 50, 0.80, 0.78)
    check_pairable(a, b, ("a", "b"))  # model and filter order may differ
    with pytest.raises(SystemExit, match="val"):
        check_pairable(a, study("gen-b", 40, 0.8, 0.8), ("a", "c"))
    result = compare(a, b, "r30-f200", "r30-f200", bootstrap=200)
    assert result["dice"]["a"]["b_minus_a"] == pytest.approx(0.03) and result["dice"]["a"]["seeds"] == [0, 1]
    # group I trained once and taken by both (same signatures) -> shared; trained again -> not shared,
    # also when the other study took its own group I from a third study
    assert shared_reference(a, b) and not shared_reference(a, study("gen-c", 50, 0.8, 0.8, group_i=1))
