"""`pathar-aug benchmark` on tiny data with real nnU-Net v2: planner, preprocessor, trainer, predictor.

The end-to-end study trains a tiny generator on the real training pool, writes one raw dataset,
preprocesses it once and trains two groups (I: real only, III: real + synthetic) as two folds of
1 epoch x 2 iterations; a second run must retrain nothing.
"""
from __future__ import annotations

import csv
import json
import os
import time
import types
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")  # read when nnunetv2 is imported
os.environ.setdefault("nnUNet_n_proc_DA", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pathar_aug.study import (  # noqa: E402
    KIND_CLASSICAL, KIND_GENERATED, KIND_REAL, KIND_RENDERED, BenchmarkSettings, plan_groups, prepare,
)
from pathar_aug.classical_augment import ClassicalAugment, augment_pair, dihedral_np, expand  # noqa: E402
from pathar_aug.study.evaluate import curve_folds  # noqa: E402
from pathar_aug.cli import app  # noqa: E402
from tests.conftest import write_pair_folders  # noqa: E402

runner = CliRunner()
LABELS = ("bright", "dark")
STUDY = ["--preset", "tiny", "--real", "4", "--synthetic", "0,4", "--synthetic-only", "0", "--extra-rows", "none",
         "--val", "4", "--epochs", "1", "--iterations", "2", "--seeds", "1", "--device", "cpu", "--quiet"]
DATASET = "Dataset980_PatharBenchmark"


def files_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime) of every file below folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    images, masks = write_pair_folders(root / "data", n=12, size=64, labels=LABELS)
    args = ["benchmark", "--images", str(images), "--masks", str(masks), "--out", str(root / "out"), *STUDY]
    t = time.time()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return types.SimpleNamespace(root=root, images=images, masks=masks, out=root / "out", args=args,
                                 seconds=time.time() - t, output=res.output)


def test_report_files_and_one_csv_row_per_group_and_label(study):
    out = study.out
    for ext in ("csv", "md", "png", "json"):
        assert (out / f"dice_scaling.{ext}").is_file(), ext
    with (out / "dice_scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["group"], r["label"]) for r in rows] == [("I", "bright"), ("I", "dark"), ("II", "bright"), ("II", "dark")]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert int(r["n_val_tiles"]) == 4
    assert [r["description"] for r in rows[::2]] == ["4 real", "4 real + 4 synthetic"]
    assert rows[0]["delta_vs_I"] == "0.0"
    assert float(rows[2]["delta_vs_I"]) == pytest.approx(float(rows[2]["dice"]) - float(rows[0]["dice"]), abs=2e-4)
    table = (out / "dice_scaling.md").read_text()
    assert "| I | 4 real |" in table and "| II | 4 real + 4 synthetic |" in table
    assert "per label" in table and "difference to group I" in table
    report = json.loads((out / "dice_scaling.json").read_text())
    assert report["resolved"]["schedule"]["epochs"] == 1 and report["resolved"]["schedule"]["iterations_per_epoch"] == 2
    assert report["resolved"]["nnunet_plans"]["patch_size"] == [32, 32]  # nnU-Net's patch = tile size
    assert report["timings"]["stages"]["plan_preprocess_s"] > 0
    assert all(f["train_s"] > 0 for f in report["timings"]["folds"].values())
    assert (out / "nnUNet_results" / DATASET).is_dir()  # trained by nnU-Net itself


def test_instance_metrics_intervals_and_learning_curve(study):
    out = study.out
    with (out / "dice_scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert r["seeds"] == "1"
        for metric in ("aji", "pq"):
            assert 0.0 <= float(r[metric]) <= 1.0
        if r["group"] == "II":
            assert float(r["delta_ci_low"]) <= float(r["delta_vs_I"]) <= float(r["delta_ci_high"])
    report = json.loads((out / "dice_scaling.json").read_text())
    fold = next(f for f in report["folds"].values() if f["group"]["numeral"] == "I")
    # the validation tiles' instance maps are the masks' connected components here (binary masks)
    assert set(report["aji_per_case"][next(iter(report["folds"]))]) == set(report["dice_per_case"][next(iter(report["folds"]))])
    with (out / "dice_scaling_curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    # group I and the largest real + synthetic group, at every curve point of the 1-epoch schedule
    assert {(r["group"], r["iteration"], r["label"]) for r in curve} == {
        (g, "2", label) for g in ("I", "II") for label in LABELS}
    point = next(r for r in curve if r["group"] == "I" and r["label"] == LABELS[0])
    assert float(point["dice"]) == pytest.approx(fold["dice_per_label"][LABELS[0]], abs=1e-4)


def test_validation_is_real_identical_in_every_fold_and_held_out_from_the_generator(study):
    from nnunet_integration.manifest import load_manifest
    from nnunet_integration.paths import nnunet_env
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    out = study.out
    pre = out / "nnUNet_preprocessed" / DATASET
    folds = json.loads((pre / "splits_final.json").read_text())
    assert len(folds) == 2
    synthetic = set(load_manifest(out / "nnUNet_raw" / DATASET).cases)
    val = folds[0]["val"]
    assert folds[1]["val"] == val and len(val) == 8
    assert not synthetic & set(val) and all(c.startswith("r-") for c in val)
    real_train = folds[0]["train"]
    assert len(real_train) == 8 and not synthetic & set(real_train)
    assert set(folds[1]["train"]) == set(real_train) | {c for c in synthetic if c.startswith("pathar_gen-s0_")}
    assert len(folds[1]["train"]) == 16

    # nnU-Net's own split loading gives the same folds
    plans = json.loads((pre / "nnUNetPlans_cpu.json").read_text())
    with nnunet_env(out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"):
        for k, fold in enumerate(folds):
            plans["continue_training"] = False  # popped by nnUNetTrainer.__init__
            trainer = nnUNetTrainer(plans=plans, configuration="2d", fold=k,
                                    dataset_json=json.loads((pre / "dataset.json").read_text()),
                                    device=torch.device("cpu"))
            train_keys, val_keys = trainer.do_split()
            assert list(val_keys) == val and sorted(train_keys) == sorted(fold["train"])

    # validation tiles come from source images the generator never trained on, and training tiles not
    heldout = set(json.loads((out / "generator" / "run.json").read_text())["data"]["heldout_sources"])
    plan = json.loads((out / "plan.json").read_text())
    val_sources = {s for sources in plan["val_sources"].values() for s in sources}
    assert val_sources and val_sources <= heldout
    assert not any(f"-{s}-t" in c for s in val_sources for c in real_train)


def test_second_run_retrains_nothing(study):
    out = study.out
    before = files_state(out / "nnUNet_results") | {f"pre/{k}": v for k, v in files_state(out / "nnUNet_preprocessed").items()}
    raw_before = files_state(out / "nnUNet_raw")
    t = time.time()
    res = runner.invoke(app, study.args)
    assert res.exit_code == 0, res.output
    assert time.time() - t < study.seconds / 2
    after = files_state(out / "nnUNet_results") | {f"pre/{k}": v for k, v in files_state(out / "nnUNet_preprocessed").items()}
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert not changed, changed
    assert files_state(out / "nnUNet_raw") == raw_before
    report = json.loads((out / "dice_scaling.json").read_text())
    assert all(f["reused"] for f in report["timings"]["folds"].values())
    with (out / "dice_scaling.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_other_settings_in_the_same_folder_are_refused(study):
    args = [a if a != "0,4" else "0,5" for a in study.args]
    res = runner.invoke(app, args)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "other settings" in text and "synthetic: [0, 4] there, [0, 5] here" in text


def test_model_whose_training_saw_a_validation_image_is_refused(study, tmp_path):
    from pathar_aug.ingest import load_pairs
    from pathar_aug.patches import split_by_image

    samples = load_pairs(study.images, study.masks)
    heldout = set(json.loads((study.out / "generator" / "run.json").read_text())["data"]["heldout_sources"])
    seed = next(s for s in range(1, 50) if {x.name for x in split_by_image(samples, 0.2, s)[1]} - heldout)
    out = tmp_path / "leak"
    res = runner.invoke(app, ["benchmark", "--images", str(study.images), "--masks", str(study.masks),
                              "--model", str(study.out / "generator"), "--split-seed", str(seed), "--out", str(out),
                              *STUDY])
    assert res.exit_code == 2, res.output
    assert "not among the held-out images" in " ".join(res.output.split())
    assert not out.exists()  # refused before anything was written


def test_reused_model_dataset_holds_every_kind_of_case(study, tmp_path):
    """--model path, all five row kinds (no nnU-Net training): composition of the one raw dataset."""
    from nnunet_integration.dataset import list_cases
    from nnunet_integration.manifest import load_manifest
    from nnunet_integration.runner import verify
    from pathar_aug.ingest import load_pairs, read_mask
    from pathar_aug.patches import make_patches, split_by_image

    settings = BenchmarkSettings(images=str(study.images), masks=str(study.masks), real=4, synthetic=(0, 3),
                                 synthetic_only=2, extra_rows="largest", val=4, model=str(study.out / "generator"),
                                 epochs=1, iterations=2, seeds=1)
    prepared = prepare(settings, tmp_path / "bench", torch.device("cpu"), log=lambda *_: None, show_progress=False)
    assert [(g.numeral, g.kind, g.real, g.extra) for g in settings.groups] == [
        ("I", KIND_REAL, 4, 0), ("II", KIND_GENERATED, 0, 2), ("III", KIND_GENERATED, 4, 3),
        ("IV", KIND_RENDERED, 4, 3), ("V", KIND_CLASSICAL, 4, 3)]
    dataset = prepared.dataset
    verify(dataset)  # nnU-Net's own integrity check
    cases = list_cases(dataset)
    synthetic = set(load_manifest(dataset).cases)
    for tag in ("gen", "ren", "cls"):
        for label in LABELS:
            assert len([c for c in synthetic if c.startswith(f"pathar_{tag}-s0_{label}-")]) == 3
    real = [c for c in cases if c not in synthetic]
    assert len(real) == 8 + 8  # 4 training + 4 validation tiles per label

    folds = prepared.plan.folds
    assert len(folds) == 5 and all(f["val"] == folds[0]["val"] for f in folds)
    assert len(folds[1]["train"]) == 4 and all(c.startswith("pathar_gen-s0_") for c in folds[1]["train"])
    assert sum(c.startswith("pathar_ren-") for c in folds[3]["train"]) == 6
    assert sum(c.startswith("pathar_cls-") for c in folds[4]["train"]) == 6

    # mask-conditioned cases carry real masks of the training pool, re-rendered images
    samples = load_pairs(study.images, study.masks)
    pool, _ = split_by_image(samples, 0.2, 0)
    pool_masks = make_patches(pool, 32, sorted(LABELS)).masks[:, 0].numpy()
    for c in sorted(synthetic):
        if c.startswith("pathar_ren-"):
            mask = read_mask(dataset / cases[c]["label"]).astype(np.uint8)
            assert any((mask == m).all() for m in pool_masks), c
        if c.startswith("pathar_cls-"):
            assert set(np.unique(read_mask(dataset / cases[c]["label"])).tolist()) <= {0, 1}


def test_plan_groups_follows_the_paper_and_the_flags():
    groups = plan_groups(30, (0, 100, 200, 400))
    assert [(g.numeral, g.description) for g in groups] == [
        ("I", "30 real"), ("II", "0 real + 100 synthetic"), ("III", "30 real + 100 synthetic"),
        ("IV", "30 real + 200 synthetic"), ("V", "30 real + 400 synthetic"),
        ("VI", "30 real + 400 mask-conditioned"), ("VII", "30 real + 400 classical aug.")]
    assert len({g.key for g in groups}) == len(groups)
    assert len(plan_groups(30, (0, 100, 200), extra_rows="all")) == 1 + 1 + 2 + 2 * 2
    assert [g.numeral for g in plan_groups(30, (0, 100), synthetic_only=0, extra_rows="none")] == ["I", "II"]
    # --no-unfiltered: group I and the filtered row only, which then carries the synthetic learning curve
    only_filtered = plan_groups(30, (0, 200), synthetic_only=0, extra_kinds=("filtered",), unfiltered=False)
    assert [(g.numeral, g.description) for g in only_filtered] == [("I", "30 real"),
                                                                   ("II", "30 real + 200 filtered synthetic")]
    settings = BenchmarkSettings(real=30, synthetic=(0, 200), synthetic_only=0, extra_kinds=("filtered",),
                                 unfiltered=False, seeds=2)
    assert settings.groups == only_filtered and settings.to_json()["unfiltered"] is False
    assert curve_folds(settings) == {("r30", 0), ("r30", 1), ("r30-f200", 0)}
    assert "unfiltered" not in BenchmarkSettings(synthetic=(0, 200)).to_json()  # older folders resume
    with_filtered = {"extra_kinds": ("filtered",)}
    assert BenchmarkSettings(**with_filtered).to_json()["filter_order"] == "draw"  # the default
    # ranked, the order of folders made before the option, is left out of settings.json so they resume;
    # so is the order of a study without a filtered row, where it means nothing
    assert "filter_order" not in BenchmarkSettings(filter_order="agreement", **with_filtered).to_json()
    assert "filter_order" not in BenchmarkSettings().to_json() and "filtered" not in BenchmarkSettings().extra_kinds
    legacy = {k: v for k, v in BenchmarkSettings(**with_filtered).to_json().items() if k != "filter_order"}
    assert BenchmarkSettings.from_json(legacy).filter_order == "agreement"  # written before the option: ranked
    assert "filter_empty" not in BenchmarkSettings(**with_filtered).to_json()  # folders made before it resume
    assert BenchmarkSettings(filter_empty="study", **with_filtered).to_json()["filter_empty"] == "study"
    with pytest.raises(ValueError, match="--filter-empty"):
        BenchmarkSettings(filter_empty="none")
    with pytest.raises(ValueError, match="--filter-order"):
        BenchmarkSettings(filter_order="size")
    for bad in (dict(real=0, synthetic=(0,)), dict(real=3, synthetic=(-1,)),
                dict(real=3, synthetic=(0,), extra_rows="some")):
        with pytest.raises(ValueError):
            plan_groups(**bad)


def test_classical_augmentation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = (rng.random((32, 32)) > 0.7).astype(np.uint8)
    # with elastic and colour off, a copy is exactly one of the 8 dihedral transforms
    plain = ClassicalAugment(elastic_px=0, channel_gain=0, contrast=0, brightness=0, gamma=0)
    img, msk = augment_pair(image, mask, np.random.default_rng(1), plain)
    k = next(k for k in range(8) if (dihedral_np(mask, k) == msk).all() and (dihedral_np(image, k) == img).all())
    assert 0 <= k < 8
    img, msk = augment_pair(image, mask, np.random.default_rng(2))
    assert img.shape == image.shape and img.dtype == np.uint8 and msk.shape == mask.shape
    assert set(np.unique(msk).tolist()) <= {0, 1} and msk.sum() > 0
    full = expand([image], [mask], 5, seed=3)
    part = expand([image], [mask], 5, seed=3, start=3)
    assert len(full) == 5 and all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(full[3:], part))
    # the torch and numpy dihedral transforms agree
    from pathar_aug.patches import dihedral

    for k in range(8):
        assert (dihedral(torch.from_numpy(mask), k).numpy() == dihedral_np(mask, k)).all()


def test_filtered_row_keeps_the_pairs_the_quality_filter_ranks_best(study, tmp_path):
    from nnunet_integration.manifest import load_manifest
    from PIL import Image

    from pathar_aug.quality_filter import QualityFilter, foreground_share, is_empty
    from pathar_aug.study import KIND_FILTERED

    settings = BenchmarkSettings(images=str(study.images), masks=str(study.masks), real=4, synthetic=(0, 3),
                                 synthetic_only=0, extra_rows="largest", extra_kinds=("rendered", "classical", "filtered"),
                                 filter_oversample=2.5,  # fractional: ceil(3 x 2.5) = 8 candidates per label
                                 val=4, model=str(study.out / "generator"), epochs=1, iterations=2, seeds=1)
    assert [(g.numeral, g.kind) for g in settings.groups][-1] == ("V", KIND_FILTERED)
    prepared = prepare(settings, tmp_path / "bench", torch.device("cpu"), log=lambda *_: None, show_progress=False)
    filtered = [c for c in load_manifest(prepared.dataset).cases if c.startswith("pathar_fil-s0_")]
    assert len(filtered) == 3 * len(LABELS)  # every label keeps its count, topped up when too few pass
    state = json.loads((prepared.out / "state.json").read_text())
    acceptance = state["stages"]["filter_acceptance"]
    assert set(acceptance) == set(LABELS)
    for counts in acceptance.values():
        assert counts["candidates"] == 8 and counts["kept"] <= 3 and counts["passed"] >= counts["kept"]
    # a resumed folder keeps the counts of the runs before it and draws nothing again
    prepare(settings, tmp_path / "bench", torch.device("cpu"), log=lambda *_: None, show_progress=False)
    assert json.loads((prepared.out / "state.json").read_text())["stages"]["filter_acceptance"] == acceptance
    # the filter the row used is the run's own
    assert QualityFilter.load(study.out / "generator").thresholds().keys() == set(LABELS)
    # --filter-empty study: the real tiles (picked nuclei first) hold no empty mask, so neither do
    # the filtered ones, topped up or not (the filter's own cap would follow the training patches)
    settings.filter_empty, settings.filter_oversample = "study", 2
    prepared = prepare(settings, tmp_path / "bench_study", torch.device("cpu"), log=lambda *_: None,
                       show_progress=False)
    masks = [np.asarray(Image.open(p)) for p in sorted((prepared.dataset / "labelsTr").glob("pathar_fil-s0_*.png"))]
    assert len(masks) == 3 * len(LABELS) and not any(is_empty(foreground_share(m)) for m in masks)


def test_border_study_reports_dice_per_class(tmp_path):
    """A 3-class study from instance masks (--mask-mode border): the one dataset holds border maps
    (real and synthetic) under dataset.json's labels, nnU-Net segments the three classes, the
    report gives each class's Dice beside the foreground Dice, AJI and PQ."""
    from nnunet_integration.dataset import list_cases
    from pathar_aug.ingest import read_mask
    from tests.conftest import write_instance_folders

    images, masks = write_instance_folders(tmp_path / "data", n=8, size=64, nuclei=8)
    out = tmp_path / "out"
    res = runner.invoke(app, ["benchmark", "--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--mask-mode", "border", *STUDY])
    assert res.exit_code == 0, res.output
    for ext in ("csv", "md", "png", "json"):
        assert (out / f"dice_scaling.{ext}").is_file(), ext

    dataset = out / "nnUNet_raw" / DATASET
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == {"background": 0, "interior": 1, "border": 2}
    cases = list_cases(dataset)
    values = {c: set(np.unique(read_mask(dataset / v["label"], keep_values=True)).tolist()) for c, v in cases.items()}
    assert all(v <= {0, 1, 2} for v in values.values())
    assert any(2 in v for c, v in values.items() if c.startswith("pathar_gen-"))  # synthetic border maps
    assert any(2 in v for c, v in values.items() if not c.startswith("pathar_"))  # real ones
    with np.load(next((out / "groups").glob("*/predictions.npz"))) as f:
        assert set().union(*(np.unique(f[k]).tolist() for k in f.files)) <= {0, 1, 2}

    with (out / "dice_scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["I", "II"]
    for r in rows:
        for metric in ("dice", "aji", "pq", "dice_interior", "dice_border"):
            assert 0.0 <= float(r[metric]) <= 1.0, (metric, r)
    assert "dice_border_delta_vs_I" in rows[0] and "dice_background" not in rows[0]
    table = (out / "dice_scaling.md").read_text()
    assert "## Dice of class interior" in table and "## Dice of class border" in table
    assert "border_to_instances" in table
    report = json.loads((out / "dice_scaling.json").read_text())
    assert set(report["dice_border_per_case"]) == set(report["dice_per_case"])
    with (out / "dice_scaling_curve.csv").open() as f:
        assert {"dice", "aji", "pq", "dice_interior", "dice_border"} <= set(next(csv.DictReader(f)))


def test_reference_study_lends_its_group_I_and_refuses_another_protocol(study, tmp_path):
    # a filtered row against the fixture's group I: same data, tiles, seeds and nnU-Net settings,
    # another generator row (GENERATOR_ONLY) -> group I is taken, not trained again
    common = ["--images", str(study.images), "--masks", str(study.masks), "--model", str(study.out / "generator"),
              "--real", "4", "--synthetic", "0,4", "--synthetic-only", "0", "--extra-rows", "largest",
              "--extra-kinds", "filtered", "--no-unfiltered", "--epochs", "1", "--iterations", "2", "--seeds", "1",
              "--device", "cpu", "--quiet"]
    out = tmp_path / "filtered"
    res = runner.invoke(app, ["benchmark", "--out", str(out), "--val", "4", "--reference", str(study.out), *common])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "dice_scaling.json").read_text())
    (mine_i,) = [r for n, r in report["folds"].items() if r["group"]["numeral"] == "I"]
    (theirs_i,) = [r for r in json.loads((study.out / "dice_scaling.json").read_text())["folds"].values()
                   if r["group"]["numeral"] == "I"]
    assert mine_i["reference"].startswith(str(study.out / "groups")) and mine_i["train_s"] is None
    assert report["dice_per_case"][next(n for n in report["folds"] if "-I-" in n)] == \
        next(v for n, v in json.loads((study.out / "dice_scaling.json").read_text())["dice_per_case"].items() if "-I-" in n)
    assert mine_i["dice_per_label"] == theirs_i["dice_per_label"]
    models = out / "nnUNet_results"
    assert not list(models.rglob("fold_0/checkpoint_final.pth")) and list(models.rglob("fold_1/checkpoint_final.pth"))
    assert "Not trained in this study" in (out / "dice_scaling.md").read_text()
    # the same command resumes with group I kept, with or without --reference
    res = runner.invoke(app, ["benchmark", "--out", str(out), "--val", "4", *common])
    assert res.exit_code == 0 and "Not trained in this study" in (out / "dice_scaling.md").read_text()
    # another protocol (other validation tiles) is refused before anything is prepared
    other = tmp_path / "other"
    res = runner.invoke(app, ["benchmark", "--out", str(other), "--val", "3", "--reference", str(study.out), *common])
    assert res.exit_code != 0 and "val differ" in " ".join(res.output.split()) and not other.exists()
