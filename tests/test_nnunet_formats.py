"""nnU-Net datasets in their own formats: `train --dataset` reads them through nnU-Net's reader, and
`synthesize --into` writes cases nnU-Net's integrity check and preprocessing accept, real files untouched.
Multi-class masks: a 3-class (background / interior / border) dataset, and instance folders with
--mask-mode border."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image
from typer.testing import CliRunner

from nnunet_integration.formats import dataset_format
from nnunet_integration.runner import plan_and_preprocess, verify
from pathar_aug.cli import app
from pathar_aug.mask_classes import instances_to_border
from tests.conftest import disc_pair, touching_nuclei

runner = CliRunner()
N_CASES, SIZE = 6, 48
TIFF_SPACING = [999.0, 0.5, 0.5]
NII_SPACING = (0.65, 0.65)
BORDER_LABELS = {"background": 0, "interior": 1, "border": 2}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_dataset(raw: Path, name: str, kind: str) -> Path:
    """A small real nnU-Net v2 dataset: 'tif' (1 channel, uint16, spacing files), 'nii' (1 channel,
    uint16 2D NIfTI with spacing), 'png' (one RGB PNG per case) or 'border' (RGB PNG, touching
    nuclei labelled background 0 / interior 1 / border 2)."""
    dataset = raw / name
    (dataset / "imagesTr").mkdir(parents=True)
    (dataset / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    ending = {"tif": ".tif", "nii": ".nii.gz", "png": ".png", "border": ".png"}[kind]
    for i in range(N_CASES):
        if kind == "border":
            rgb, instances = touching_nuclei(SIZE, rng, n=6)
            mask = instances_to_border(instances)
        else:
            rgb, mask = disc_pair(SIZE, rng, dark_background=True)
        case = f"cell{i:02d}"
        image_path = dataset / "imagesTr" / f"{case}_0000{ending}"
        label_path = dataset / "labelsTr" / f"{case}{ending}"
        gray16 = (rgb.mean(axis=-1) * 40 + 500).astype(np.uint16)  # fluorescence-like 16-bit range
        if kind == "tif":
            tifffile.imwrite(image_path, gray16[None])
            tifffile.imwrite(label_path, mask[None])
            for folder in ("imagesTr", "labelsTr"):
                (dataset / folder / f"{case}.json").write_text(json.dumps({"spacing": TIFF_SPACING}))
        elif kind == "nii":
            for arr, path in ((gray16, image_path), (mask, label_path)):
                img = sitk.GetImageFromArray(arr)
                img.SetSpacing(NII_SPACING)
                sitk.WriteImage(img, str(path), True)
        else:
            Image.fromarray(rgb).save(image_path)
            Image.fromarray(mask).save(label_path)
    channels = {"0": "R", "1": "G", "2": "B"} if kind in ("png", "border") else {"0": "DAPI"}
    labels = BORDER_LABELS if kind == "border" else {"background": 0, "nucleus": 1}
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": channels, "labels": labels,
        "numTraining": N_CASES, "file_ending": ending}, indent=2))
    return dataset


def train(dataset_id: str, out: Path) -> None:
    res = runner.invoke(app, ["train", "--dataset", dataset_id, "--preset", "tiny", "--tokenizer-steps", "2",
                              "--prior-steps", "2", "--out", str(out), "--quiet", "--val-fraction", "0.2"])
    assert res.exit_code == 0, res.output
    settings = json.loads((out / "run.json").read_text())
    assert settings["settings"]["dataset"].endswith(dataset_id if not dataset_id.isdigit() else "")


def synthesize(model: Path, into: str, *extra: str) -> object:
    return runner.invoke(app, ["synthesize", "--model", str(model), "--into", into, "--n", "4", "--batch-size", "4",
                               "--no-filter", *extra])


def check_written(dataset: Path, dataset_id: int, real: dict[str, str], n: int = 4) -> list[str]:
    """Synthetic cases listed, real files byte-identical, nnU-Net's integrity check and preprocessing pass."""
    dj = json.loads((dataset / "dataset.json").read_text())
    synthetic = sorted(c for c in dj["dataset"] if c.startswith("pathar_"))
    assert len(synthetic) == n and dj["numTraining"] == N_CASES + n
    after = snapshot(dataset)
    assert all(after[f] == h for f, h in real.items() if f != "dataset.json")
    verify(dataset)
    plan_and_preprocess(dataset_id, num_processes=1, cpu_network=True)
    return synthetic


@pytest.mark.parametrize("kind", ["tif", "nii"])
def test_one_channel_dataset_train_and_synthesize(nnunet_dirs, tmp_path, one_thread, kind):
    dataset_id = {"tif": 521, "nii": 522}[kind]
    dataset = make_dataset(nnunet_dirs["raw"], f"Dataset{dataset_id}_Gray{kind.capitalize()}", kind)
    real = snapshot(dataset)
    train(str(dataset_id), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["image_channels"] == 1
    assert snapshot(dataset) == real  # training reads, never writes

    res = synthesize(tmp_path / "run", str(dataset_id))
    assert res.exit_code == 0, res.output
    synthetic = check_written(dataset, dataset_id, real)
    ending = ".tif" if kind == "tif" else ".nii.gz"
    lo, hi = dataset_format(dataset).value_range[0]  # real cases only: the manifest's cases are left out
    for case in synthetic:
        image_path = dataset / "imagesTr" / f"{case}_0000{ending}"
        assert not (dataset / "imagesTr" / f"{case}_0001{ending}").exists()
        if kind == "tif":
            image = tifffile.imread(image_path)
            assert image.shape == (1, 32, 32) and image.dtype == np.uint16
            for folder in ("imagesTr", "labelsTr"):  # spacing copied from the real cases
                assert json.loads((dataset / folder / f"{case}.json").read_text())["spacing"] == TIFF_SPACING
        else:
            itk = sitk.ReadImage(str(image_path))
            image = sitk.GetArrayFromImage(itk)
            assert image.shape == (32, 32) and image.dtype == np.uint16
            assert itk.GetSpacing() == pytest.approx(NII_SPACING)
            assert sitk.ReadImage(str(dataset / "labelsTr" / f"{case}{ending}")).GetSpacing() == pytest.approx(NII_SPACING)
        assert lo - 1 <= image.min() and image.max() <= hi + 1  # the real cases' intensity range

    # a gray generator into an RGB dataset: refused, nothing written; --channels rgb converts
    rgb = make_dataset(nnunet_dirs["raw"], f"Dataset{dataset_id + 10}_Rgb", "png")
    before = snapshot(rgb)
    res = synthesize(tmp_path / "run", str(dataset_id + 10))
    assert res.exit_code == 2 and "--channels rgb" in " ".join(res.output.split()), res.output
    assert snapshot(rgb) == before
    res = synthesize(tmp_path / "run", str(dataset_id + 10), "--channels", "rgb")
    assert res.exit_code == 0, res.output
    if kind == "tif":  # once is enough: nnU-Net accepts the converted cases
        check_written(rgb, dataset_id + 10, before)
        # a new dataset holds RGB PNGs: a gray generator needs --channels rgb there too, and nothing is created
        res = synthesize(tmp_path / "run", "Dataset599_New")
        assert res.exit_code == 2 and "--channels rgb" in " ".join(res.output.split()), res.output
        assert not (nnunet_dirs["raw"] / "Dataset599_New").exists()


def test_rgb_png_dataset_train_and_synthesize(nnunet_dirs, tmp_path, one_thread):
    dataset = make_dataset(nnunet_dirs["raw"], "Dataset523_RgbPng", "png")
    real = snapshot(dataset)
    train("Dataset523_RgbPng", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["image_channels"] == 3
    res = synthesize(tmp_path / "run", "523")
    assert res.exit_code == 0, res.output
    for case in check_written(dataset, 523, real):
        image = np.asarray(Image.open(dataset / "imagesTr" / f"{case}_0000.png"))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8

    # an RGB generator into a 1-channel dataset: refused, nothing written; --channels gray converts
    gray = make_dataset(nnunet_dirs["raw"], "Dataset524_GrayTif", "tif")
    before = snapshot(gray)
    res = synthesize(tmp_path / "run", "524")
    assert res.exit_code == 2 and "--channels gray" in " ".join(res.output.split()), res.output
    assert snapshot(gray) == before
    res = synthesize(tmp_path / "run", "524", "--channels", "gray")
    assert res.exit_code == 0, res.output
    check_written(gray, 524, before)

    # --resume from the run folder alone finds the dataset again
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--resume", "--quiet"])
    assert res.exit_code == 0, res.output


def label_values(dataset: Path, cases: list[str]) -> set[int]:
    return {int(v) for case in cases for v in np.unique(np.asarray(Image.open(dataset / "labelsTr" / f"{case}.png")))}


def test_three_class_border_dataset_train_and_synthesize(nnunet_dirs, tmp_path, one_thread):
    dataset = make_dataset(nnunet_dirs["raw"], "Dataset525_Border", "border")
    real = snapshot(dataset)
    train("525", tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["classes"] == BORDER_LABELS and run["data"]["mask_classes"] == BORDER_LABELS
    assert run["settings"]["tokenizer"]["num_classes"] == 3  # the K-way tokenizer
    assert snapshot(dataset) == real

    res = synthesize(tmp_path / "run", "525")
    assert res.exit_code == 0, res.output
    synthetic = check_written(dataset, 525, real)
    assert label_values(dataset, synthetic) <= set(BORDER_LABELS.values())  # the dataset's own label ids
    for case in synthetic:
        assert np.asarray(Image.open(dataset / "labelsTr" / f"{case}.png")).shape == (32, 32)

    # 3-class masks do not go into a binary dataset: refused, nothing written
    binary = make_dataset(nnunet_dirs["raw"], "Dataset526_Binary", "png")
    before = snapshot(binary)
    res = synthesize(tmp_path / "run", "526")
    assert res.exit_code == 2 and "mask classes" in " ".join(res.output.split()), res.output
    assert snapshot(binary) == before

    # a new dataset is made with the generator's classes; the filter scores each class too
    res = runner.invoke(app, ["synthesize", "--model", str(tmp_path / "run"), "--into", "Dataset527_NewBorder",
                              "--n", "4", "--batch-size", "4", "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    new = nnunet_dirs["raw"] / "Dataset527_NewBorder"
    assert json.loads((new / "dataset.json").read_text())["labels"] == BORDER_LABELS
    verify(new)
    manifest = json.loads((new / "pathar_aug_manifest.json").read_text())
    for entry in manifest["cases"].values():
        assert set(entry["scores"]["class_agreement"]) == {"interior", "border"}


def test_border_mode_from_instance_mask_folders(nnunet_dirs, tmp_path, one_thread):
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(2)
    for i in range(N_CASES):
        rgb, instances = touching_nuclei(SIZE, rng, n=6)
        Image.fromarray(rgb).save(images / f"cell{i:02d}.png")
        Image.fromarray(instances.astype(np.uint16)).save(masks / f"cell{i:02d}.png")  # 16-bit instance ids
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--mask-mode", "border",
                              "--preset", "tiny", "--tokenizer-steps", "2", "--prior-steps", "2", "--out", str(out),
                              "--quiet", "--val-fraction", "0.2"])
    assert res.exit_code == 0, res.output
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["mask_mode"] == "border" and settings["classes"] == BORDER_LABELS
    patches = __import__("torch").load(out / "data" / "patches.pt", weights_only=False)["train"]
    assert set(patches.masks.unique().tolist()) == {0, 1, 2}  # instance masks became border maps

    res = synthesize(out, "528")
    assert res.exit_code == 0, res.output
    dataset = nnunet_dirs["raw"] / "Dataset528_PatharAug"
    assert json.loads((dataset / "dataset.json").read_text())["labels"] == BORDER_LABELS
    cases = sorted(json.loads((dataset / "dataset.json").read_text())["dataset"])
    assert len(cases) == 4 and label_values(dataset, cases) <= {0, 1, 2}
    verify(dataset)

    # a resumed run keeps its mask mode
    res = runner.invoke(app, ["train", "--out", str(out), "--resume", "--quiet", "--mask-mode", "classes"])
    assert res.exit_code == 2 and "--mask-mode" in res.output, res.output


def test_import_instance_masks_as_border_maps(nnunet_dirs, tmp_path):
    """`import --mask-mode border` writes instance masks as a border run's cases: background 0,
    interior 1, border 2, dataset.json labels to match; `--classes` imports class-id masks as they are."""
    from pathar_aug.ingest import read_mask
    from tests.conftest import write_instance_folders

    images, masks = write_instance_folders(tmp_path / "data", n=N_CASES, size=SIZE)
    res = runner.invoke(app, ["import", "--images", str(images), "--masks", str(masks), "--into", "530",
                              "--mask-mode", "border"])
    assert res.exit_code == 0, res.output
    dataset = nnunet_dirs["raw"] / "Dataset530_PatharAug"
    dj = json.loads((dataset / "dataset.json").read_text())
    assert dj["labels"] == BORDER_LABELS and dj["numTraining"] == N_CASES
    verify(dataset)  # nnU-Net's integrity check
    borders = {}
    for f in sorted(masks.iterdir()):
        written = np.asarray(Image.open(dataset / "labelsTr" / f.name))
        borders[f.name] = instances_to_border(read_mask(f))
        assert set(np.unique(written).tolist()) <= {0, 1, 2}
        assert np.array_equal(written, borders[f.name])
    assert any((b == 2).any() for b in borders.values())

    # class-id masks with --classes: written as they are, the classes become the labels
    class_masks = tmp_path / "class_masks"
    class_masks.mkdir()
    for name, b in borders.items():
        Image.fromarray(b).save(class_masks / name)
    res = runner.invoke(app, ["import", "--images", str(images), "--masks", str(class_masks), "--into", "531",
                              "--classes", "background=0,interior=1,border=2"])
    assert res.exit_code == 0, res.output
    other = nnunet_dirs["raw"] / "Dataset531_PatharAug"
    assert json.loads((other / "dataset.json").read_text())["labels"] == BORDER_LABELS
    assert all(np.array_equal(np.asarray(Image.open(other / "labelsTr" / n)), b) for n, b in borders.items())

    # a binary dataset does not take border maps: refused, nothing written
    binary = make_dataset(nnunet_dirs["raw"], "Dataset532_Binary", "png")
    before = snapshot(binary)
    res = runner.invoke(app, ["import", "--images", str(images), "--masks", str(masks), "--into", "532",
                              "--mask-mode", "border"])
    assert res.exit_code == 2 and "mask classes" in " ".join(res.output.split()), res.output
    assert snapshot(binary) == before
