"""Mask classes: the --classes syntax and its errors, class ids read from masks, and the border
encoding of instance masks and back (round trip on touching nuclei and on DSB2018 nuclei)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.ingest import IngestError, find_files, read_mask
from pathar_aug.instance_metrics import (
    aggregated_jaccard,
    instances_from_binary,
    panoptic_quality,
)
from pathar_aug.mask_classes import (
    BINARY,
    BORDER_CLASSES,
    MaskClasses,
    as_classes,
    border_to_instances,
    instances_to_border,
    parse_classes,
    resolve_classes,
)
from pathar_aug.pipeline import RunSettings
from pathar_aug.validate import ArgumentError
from tests.conftest import DEMO, touching_nuclei

runner = CliRunner()


# ------------------------------------------------------------------------------------ --classes
def test_classes_parse_in_any_order_with_spaces():
    classes = parse_classes(" border=2, background = 0,interior=1 ")
    assert classes.names == ("background", "interior", "border") and classes.k == 3 and not classes.binary
    assert classes.mapping() == {"background": 0, "interior": 1, "border": 2}
    assert parse_classes(classes.describe()) == classes
    assert parse_classes("background=0,nucleus=1").binary


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("background", "is not name=id"),
    ("background=0,=1", "is not name=id"),
    ("background=0,nucleus=one", "is not a whole number"),
    ("background=0,nucleus=1,nucleus=2", "named twice"),
    ("background=0,a=1,b=1", "given twice"),
    ("nucleus=1,border=2", "0, 1, ... K-1"),
    ("background=0,border=2", "0, 1, ... K-1"),
    ("background=0", "at least 2 classes"),
    ("background=-1,nucleus=0", "0, 1, ... K-1"),
])
def test_bad_classes_are_clear_errors(text, message):
    with pytest.raises(ArgumentError, match="--classes") as err:
        parse_classes(text)
    assert message in str(err.value)


def test_dataset_labels_become_classes_and_region_labels_are_refused():
    assert MaskClasses.from_mapping({"border": 2, "background": 0, "interior": 1}) == BORDER_CLASSES
    with pytest.raises(ValueError, match="region labels"):
        MaskClasses.from_mapping({"background": 0, "nucleus": 1, "both": [1, 2]})


def test_resolve_classes_rules():
    assert resolve_classes(None, "classes") == BINARY
    assert resolve_classes(None, "border") == BORDER_CLASSES
    assert resolve_classes(None, "classes", {"background": 0, "a": 1, "b": 2}).names == ("background", "a", "b")
    with pytest.raises(ArgumentError, match="instance masks"):
        resolve_classes(None, "border", {"background": 0, "nucleus": 1})
    with pytest.raises(ArgumentError, match="leave out --classes"):
        resolve_classes(CLASSES_TEXT, "border")
    with pytest.raises(ArgumentError, match="dataset.json's labels"):
        resolve_classes(CLASSES_TEXT, "classes", {"background": 0, "nucleus": 1})
    with pytest.raises(ArgumentError, match="--mask-mode"):
        resolve_classes(None, "instances")


CLASSES_TEXT = "background=0,interior=1,border=2"


def test_masks_read_as_class_ids(tmp_path):
    mask = np.array([[0, 2], [2, 0]], np.uint8)  # two values, but not binary: border only
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").max() == 1  # binary reading, as always
    kept = read_mask(tmp_path / "m.png", keep_values=True)
    assert np.array_equal(as_classes(kept, BORDER_CLASSES), mask)
    assert np.array_equal(BINARY.to_index(np.array([[0, 7], [255, 0]])), [[0, 1], [1, 0]])
    with pytest.raises(IngestError, match=r"m\.png: mask holds value\(s\) \[5\]"):
        BORDER_CLASSES.to_index(np.array([[0, 5], [1, 2]]), str(tmp_path / "m.png"))


def test_runs_of_older_versions_have_binary_masks():
    from pathar_aug.prior import PRIOR_PRESETS
    from pathar_aug.tokenizer import TOKENIZER_PRESETS

    settings = RunSettings("i", "m", None, "tiny", TOKENIZER_PRESETS["tiny"], PRIOR_PRESETS["tiny"])
    data = settings.to_json()
    for key in ("classes", "mask_mode"):
        del data[key]
    del data["tokenizer"]["num_classes"]
    old = RunSettings.from_json(json.loads(json.dumps(data)))
    assert old.mask_classes == BINARY and old.mask_mode == "classes" and old.tokenizer.num_classes == 2


# -------------------------------------------------------------------------------- border mode
def test_border_separates_touching_nuclei():
    rng = np.random.default_rng(0)
    _, instances = touching_nuclei(96, rng, n=20)
    classes = instances_to_border(instances)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.array_equal(classes > 0, instances > 0)  # the foreground is kept exactly
    # no interior pixel touches another nucleus or the background: a border ring lies between
    interior = classes == 1
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        neighbour = np.roll(instances, (dy, dx), axis=(0, 1))
        inner = interior & np.roll(interior, (dy, dx), axis=(0, 1))
        assert not np.any(inner & (neighbour != instances))
    touching = np.any((instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0))
    assert touching  # the test data really has touching nuclei


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_border_round_trip_recovers_touching_nuclei(seed):
    rng = np.random.default_rng(seed)
    _, instances = touching_nuclei(128, rng, n=25)
    back = border_to_instances(instances_to_border(instances))
    assert len(np.unique(back)) == len(np.unique(instances))
    assert aggregated_jaccard(instances, back) > 0.97
    assert panoptic_quality(instances, back) > 0.97


def test_border_round_trip_on_dsb2018_nuclei():
    """The bundled DSB2018 masks are binary: their connected components are the instances. Where a
    component is two nuclei joined by a neck 1-2 px wide (histology clumps), the neck becomes all
    border and the round trip splits it: that is the border map separating nuclei, so not every
    tile reaches 1."""
    files = find_files(DEMO / "masks", (".png",))
    assert len(files) == 36
    aji, pq = [], []
    for f in files:
        instances = instances_from_binary(read_mask(f))
        back = border_to_instances(instances_to_border(instances))
        aji.append(aggregated_jaccard(instances, back))
        pq.append(panoptic_quality(instances, back))
    assert np.mean(aji) > 0.98 and min(aji) > 0.9
    assert np.mean(pq) > 0.98 and min(pq) > 0.9


def test_tiny_nuclei_without_interior_stay_instances():
    instances = np.zeros((12, 12), np.int32)
    instances[2:4, 2:4] = 1  # 2 x 2: all border
    instances[6:11, 6:11] = 2
    classes = instances_to_border(instances)
    assert not np.any(classes[2:4, 2:4] == 1)
    back = border_to_instances(classes)
    assert aggregated_jaccard(instances, back) == 1.0
    assert np.array_equal(border_to_instances(np.zeros((4, 4), np.uint8)), np.zeros((4, 4)))


def test_wider_borders_and_bad_input():
    rng = np.random.default_rng(3)
    _, instances = touching_nuclei(96, rng, n=12)
    thin, wide = instances_to_border(instances), instances_to_border(instances, width=2)
    assert (wide == 2).sum() > (thin == 2).sum() and np.array_equal(wide > 0, thin > 0)
    with pytest.raises(ValueError, match="2-D"):
        instances_to_border(np.zeros((2, 2, 2), np.int32))
    with pytest.raises(ValueError, match="negative"):
        instances_to_border(-np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="at least 1"):
        instances_to_border(instances, width=0)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_refuses_bad_classes_before_writing(tmp_path, pair_folders):
    images, masks = pair_folders
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--preset", "tiny", "--quiet", "--classes", "background=0,border=2"])
    assert res.exit_code == 2 and "--classes" in res.output and "K-1" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--preset", "tiny", "--quiet", "--mask-mode", "border", "--classes", CLASSES_TEXT])
    assert res.exit_code == 2 and "leave out --classes" in " ".join(res.output.split()), res.output
    # masks with values that are not class ids: named, nothing written
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--preset", "tiny", "--quiet", "--classes", CLASSES_TEXT])
    assert res.exit_code == 2 and "not label ids" in " ".join(res.output.split()), res.output
    assert not out.exists()


# --------------------------------------------------------------------------- evaluation, per class
def border_pairs(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(img, instances_to_border(inst)) for img, inst in (touching_nuclei(48, rng, n=5) for _ in range(n))]


def test_k_way_segmenter_and_per_class_dice_in_the_report(tmp_path, one_thread):
    from pathar_aug.evaluation import (
        ColourTextureFeatures,
        EvalConfig,
        Segmenter,
        SegmenterConfig,
        evaluate_sets,
    )

    fast = SegmenterConfig(image_size=48, crop=32, width=8, steps=80, batch_size=8, lr=5e-3)
    real = {"nuclei": border_pairs(30, seed=0)}
    seg = Segmenter.fit(real["nuclei"], fast, "cpu", progress=False, classes=3)
    fresh = border_pairs(8, seed=300)
    pred = seg.predict([fresh[0][0]])[0]
    assert pred.shape == (48, 48) and pred.dtype == np.uint8 and set(np.unique(pred)) <= {0, 1, 2}
    per_class = seg.class_dice_against(fresh)
    assert per_class.shape == (8, 2) and per_class[:, 0].mean() > 0.6  # interior
    assert seg.dice_against(fresh).mean() > 0.8  # foreground against foreground
    seg.save(tmp_path / "seg.pt")
    assert Segmenter.load(tmp_path / "seg.pt", "cpu").classes == 3

    cfg = EvalConfig(kid_subsets=5, progress=False, device="cpu", train_style_classifier=False, segmenter=fast,
                     mask_classes=BORDER_CLASSES.names, mask_mode="border")
    df = evaluate_sets(real, {"held_out": {"nuclei": fresh}}, [ColourTextureFeatures()], config=cfg)
    rows = df[(df["set"] == "held_out") & (df["feature_space"] == "segmenter")].set_index("metric")
    assert {"image_mask_dice", "image_mask_dice_interior", "image_mask_dice_border"} <= set(rows.index)
    assert rows.loc["image_mask_dice_border", "ideal"].startswith("1")
    # structure statistics count the nuclei of the border maps (touching ones apart), not their classes
    nuclei = df[(df["set"] == "real") & (df["metric"] == "nuclei_per_patch_mean")]["value"].iloc[0]
    assert nuclei > 3
