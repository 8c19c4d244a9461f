"""Regression tests for the malformed-input sweep (issue 14): one test per numbered defect.

Each bad input either is read correctly or stops with exit code 2 and one line naming the file
or option, without a traceback and without writing anything.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.ingest import IngestError, load_pairs, read_image, read_label_csv, read_mask
from tests.conftest import write_pair_folders

runner = CliRunner()
TINY = ["--preset", "tiny", "--tokenizer-steps", "2", "--prior-steps", "2", "--quiet", "--device", "cpu"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(args: list[str]):
    """Run the CLI; a traceback (any exception other than the exit) fails the test at once."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    return lines[0]


def assert_user_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    line = one_line(result.output)
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield




@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny run (2 + 2 steps) trained once through the CLI."""
    root = tmp_path_factory.mktemp("bad_input")
    images, masks = write_pair_folders(root / "data", n=6, size=40, labels=("bright", "dark"))
    result = invoke(["train", "--images", images, "--masks", masks, "--out", root / "run", *TINY])
    assert result.exit_code == 0, result.output
    return {"root": root, "images": images, "masks": masks, "run": root / "run"}


# ------------------------------------------------------------ 1-5: silently turned into wrong data
def test_01_same_folder_for_images_and_masks_is_refused(tmp_path):
    images, _ = write_pair_folders(tmp_path)
    with pytest.raises(IngestError, match="masks folder is the images folder"):
        load_pairs(images, images)
    before = snapshot(tmp_path)
    res = invoke(["train", "--images", images, "--masks", images, "--out", tmp_path / "run", *TINY])
    assert_user_error(res, str(images))
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_01_masks_folder_inside_the_images_folder_reads_correctly(tmp_path):
    images, masks = write_pair_folders(tmp_path)
    masks.rename(images / "masks")  # images/*.png and images/masks/*.png
    samples = load_pairs(images, images / "masks")
    assert len(samples) == 4 and all(0 < s.binary_mask.mean() < 1 for s in samples)


def test_02_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (200, 30, 40)
    rgb[:, 16:32] = (20, 180, 60)
    rgb[:, 32:] = (240, 240, 230)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = read_image(tmp_path / "c.jpg")
    assert np.abs(out.astype(int) - rgb).mean() < 6


def test_02_cmyk_tiff_is_converted_to_rgb(tmp_path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 0] = 255  # pure cyan
    tifffile.imwrite(tmp_path / "c.tif", cmyk, photometric="separated")
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif")[0, 0], [0, 255, 255])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_03_float_tiff_with_nan_is_refused_naming_the_file(tmp_path, bad):
    arr = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20)
    arr[3, 4] = bad
    tifffile.imwrite(tmp_path / "f.tif", arr)
    with pytest.raises(IngestError, match=r"f\.tif: 1 of 400 pixels are NaN or infinite"):
        read_image(tmp_path / "f.tif")
    tifffile.imwrite(tmp_path / "m.tif", np.where(np.isfinite(arr), 0, arr))
    with pytest.raises(IngestError, match=r"m\.tif: 1 of 400 pixels are NaN"):
        read_mask(tmp_path / "m.tif")


def test_04_palette_mask_with_white_background_is_read_by_index(tmp_path):
    index = np.zeros((20, 20), np.uint8)
    index[5:10, 5:10] = 1
    im = Image.fromarray(index, mode="L").convert("P")
    im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, 1 black
    im.putdata(index.ravel().tolist())
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), index)


def test_05_three_plane_tiff_stack_is_refused_not_read_as_rgb(tmp_path):
    stack = np.random.default_rng(0).integers(0, 255, (3, 20, 20), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "z.tif", stack, photometric="minisblack")
    with pytest.raises(IngestError, match=r"z\.tif: TIFF holds several planes .*z-stack"):
        read_image(tmp_path / "z.tif")
    # the same array marked as planar RGB is a colour image
    tifffile.imwrite(tmp_path / "rgb.tif", stack, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), np.moveaxis(stack, 0, -1))


def test_05_all_empty_masks_are_refused(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=3)
    for f in masks.glob("*.png"):
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(f)
    with pytest.raises(IngestError, match="every other mask .* is empty"):
        load_pairs(images, masks)
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(masks / "case000.png")
    assert len(load_pairs(images, masks)) == 3  # one mask with nuclei: empty tiles are normal


# ------------------------------------------------------------ 6-11: tracebacks instead of one line
def test_06_too_long_stem_on_import_is_refused_before_anything_is_written(tmp_path, nnunet_dirs):
    images, masks = write_pair_folders(tmp_path / "data", n=2)
    long = "x" * 245
    (images / "case001.png").rename(images / f"{long}.png")
    (masks / "case001.png").rename(masks / f"{long}.png")
    res = invoke(["import", "--images", images, "--masks", masks, "--into", "501"])
    assert_user_error(res, long, "too long")
    assert list(nnunet_dirs["raw"].iterdir()) == []


@pytest.mark.parametrize("where", ["file", "below_file"])
def test_07_out_naming_a_file_is_a_clear_error(tmp_path, where):
    images, masks = write_pair_folders(tmp_path / "data")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "run"
    before = snapshot(tmp_path)
    res = invoke(["train", "--images", images, "--masks", masks, "--out", out, *TINY])
    assert_user_error(res, "afile")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, option", [(["--batch-size", "0"], "--batch-size"), (["--batch-size", "-3"], "--batch-size"),
                                          (["--tokenizer-steps", "-5"], "--tokenizer-steps"),
                                          (["--prior-steps", "0"], "--prior-steps"),
                                          (["--val-fraction", "nan"], "--val-fraction"), (["--seed", "-1"], "--seed")])
def test_08_bad_training_numbers_stop_before_anything_is_written(tmp_path, args, option):
    images, masks = write_pair_folders(tmp_path / "data")
    before = snapshot(tmp_path)
    res = invoke(["train", "--images", images, "--masks", masks, "--out", tmp_path / "run", *TINY, *args])
    assert_user_error(res, option)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    # the folder is not poisoned: a correct run can start in it
    assert not (tmp_path / "run" / "run.json").exists()


def test_09_unknown_device_is_a_clear_error(tmp_path, trained, nnunet_dirs):
    images, masks = write_pair_folders(tmp_path / "data")
    res = invoke(["train", "--images", images, "--masks", masks, "--out", tmp_path / "run", "--preset", "tiny",
                  "--device", "gpu"])
    assert_user_error(res, "--device 'gpu'")
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "gpu"])
    assert_user_error(res, "--device 'gpu'")
    assert not (tmp_path / "run").exists() and list(nnunet_dirs["raw"].iterdir()) == []


def test_10_synthesize_into_a_dataset_being_written_is_a_clear_error(trained, nnunet_dirs):
    from nnunet_integration.atomic import exclusive_dir_lock
    from nnunet_integration.paths import resolve_dataset

    dataset = resolve_dataset("501", create=True)
    before = snapshot(dataset)
    with exclusive_dir_lock(dataset, "writing"):  # what another synthesize holds while it writes
        res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "cpu"])
    assert_user_error(res, "another process is already writing", str(dataset))
    assert snapshot(dataset) == before


@pytest.mark.parametrize("args, option", [(["--cfg", "nan"], "--cfg"), (["--temperature", "nan"], "--temperature"),
                                          (["--cfg", "inf"], "--cfg"), (["--top-p", "nan"], "--top-p"),
                                          (["--top-k", "-1"], "--top-k"), (["--seed", "-2"], "--seed")])
def test_11_nan_sampling_options_stop_before_any_write(trained, nnunet_dirs, args, option):
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "cpu", *args])
    assert_user_error(res, option)
    assert list(nnunet_dirs["raw"].iterdir()) == []


# ------------------------------------------------------------ 12-14: recovery as the messages say
def test_12_kill_during_the_data_stage_resumes_from_the_folder_alone(tmp_path, monkeypatch):
    import pathar_aug.pipeline as pipeline

    images, masks = write_pair_folders(tmp_path / "data", n=4, size=40)
    run = tmp_path / "run"
    real_save = pipeline.save_checkpoint

    def killed(path, **state):  # dies half-way through writing the patches, as kill -9 would
        Path(str(path) + ".tmp").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare_run(run, pipeline.make_settings(images, masks, None, "tiny", {"steps": 2}, {"steps": 2}),
                             resume=False)
    monkeypatch.setattr(pipeline, "save_checkpoint", real_save)
    assert not (run / "run.json").exists()
    res = invoke(["train", "--out", run, "--resume", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "run.json").is_file() and (run / "prior" / "prior.pt").is_file()


def test_12_leftovers_of_a_killed_data_stage_are_explained(tmp_path):
    images, masks = write_pair_folders(tmp_path / "data", n=4, size=40)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "patches.pt").write_bytes(b"")  # what older versions left after a kill
    res = invoke(["train", "--out", run, "--resume", "--quiet"])
    assert_user_error(res, str(run), "--images")
    res = invoke(["train", "--images", images, "--masks", masks, "--out", run, "--resume", *TINY])
    assert res.exit_code == 0, res.output
    assert (run / "run.json").is_file()


def test_13_resume_needs_only_the_run_folder(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "prior" / "prior.pt").unlink()  # interrupted before the prior finished
    res = invoke(["synthesize", "--model", run, "--into", str(tmp_path / "Dataset501_X"), "--n", "1"])
    suggested = assert_user_error(res, "incomplete")
    assert f"pathar-aug train --out {run} --resume" in suggested
    res = invoke(["train", "--out", run, "--resume", "--quiet", "--device", "cpu"])  # exactly that command
    assert res.exit_code == 0, res.output
    assert (run / "prior" / "prior.pt").is_file()
    # without --resume, --images and --masks are needed
    res = invoke(["train", "--out", tmp_path / "new", "--preset", "tiny"])
    assert_user_error(res, "--images and --masks")


def test_14_resume_with_more_prior_steps_trains_on(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    res = invoke(["train", "--out", run, "--resume", "--prior-steps", "4", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert torch.load(run / "prior" / "prior.pt", weights_only=False)["step"] == 4
    assert json.loads((run / "run.json").read_text())["settings"]["prior"]["steps"] == 4
    # options a resume cannot honour are refused, never silently ignored
    before = snapshot(run)
    for args, option in ((["--tokenizer-steps", "9"], "--tokenizer-steps"), (["--prior-steps", "3"], "--prior-steps"),
                         (["--seed", "5"], "--seed"), (["--images", str(tmp_path)], "--images")):
        res = invoke(["train", "--out", run, "--resume", "--quiet", *args])
        assert_user_error(res, option, str(run))
    assert snapshot(run) == before


# ------------------------------------------------------------ 15: label CSVs as spreadsheets write them
@pytest.fixture
def three(tmp_path) -> tuple[Path, Path]:
    return write_pair_folders(tmp_path, n=3)


def test_15_csv_with_utf8_bom(three, tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_bytes("name,label\ncase000,a\ncase001,b\ncase002,a\n".encode("utf-8-sig"))
    assert {s.name: s.label for s in load_pairs(*three, csv)} == {"case000": "a", "case001": "b", "case002": "a"}


def test_15_csv_names_with_dots(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    for folder in (images, masks):
        (folder / "case000.png").rename(folder / "s0.v1.png")
    csv = tmp_path / "l.csv"
    csv.write_text("name,label\ns0.v1,a\ncase001.png,b\n")
    assert read_label_csv(csv, {"s0.v1", "case001"}) == {"s0.v1": "a", "case001": "b"}
    assert {s.name: s.label for s in load_pairs(images, masks, csv)} == {"s0.v1": "a", "case001": "b"}


def test_15_csv_two_labels_for_one_file(three, tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("name,label\ncase000,a\ncase001,b\ncase002,a\ncase000.png,b\n")
    with pytest.raises(IngestError, match=r"l\.csv: rows 2 and 5 give 'case000' two labels"):
        load_pairs(*three, csv)


def test_15_csv_without_header_counts_rows_from_1(three, tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("ghost,a\ncase001,b\ncase002,a\n")
    with pytest.raises(IngestError, match=r"l\.csv: row 1 names 'ghost'"):
        load_pairs(*three, csv)


def test_15_latin1_csv_and_png_as_csv_name_the_file(three, tmp_path):
    csv = tmp_path / "latin.csv"
    csv.write_bytes("name,label\ncase000,Färbung\ncase001,b\ncase002,b\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"latin\.csv: not UTF-8 text .*CSV UTF-8"):
        load_pairs(*three, csv)
    images, _ = three
    with pytest.raises(IngestError, match=r"case000\.png: this is a PNG image, not a CSV"):
        load_pairs(*three, images / "case000.png")
    res = invoke(["import", "--images", images, "--masks", three[1], "--labels", csv, "--into", str(tmp_path / "Dataset501_X")])
    assert_user_error(res, str(csv))
    assert not (tmp_path / "Dataset501_X").exists()


def test_15_colliding_case_names_name_both_files(tmp_path, nnunet_dirs):
    images, masks = write_pair_folders(tmp_path / "data", n=2)
    for folder in (images, masks):
        (folder / "case000.png").rename(folder / "a b.png")
        (folder / "case001.png").rename(folder / "a-b.png")
    res = invoke(["import", "--images", images, "--masks", masks, "--into", "501"])
    assert_user_error(res, "a b.png", "a-b.png", "'a-b'")
    assert list(nnunet_dirs["raw"].iterdir()) == []


# ------------------------------------------------------------ 16: folders and layouts
def test_16_ipynb_checkpoints_are_ignored(three):
    images, masks = three
    for folder in (images, masks):
        (folder / ".ipynb_checkpoints").mkdir()
        (folder / ".ipynb_checkpoints" / "case000-checkpoint.png").write_bytes((folder / "case000.png").read_bytes())
    assert [s.name for s in load_pairs(images, masks)] == ["case000", "case001", "case002"]


def test_16_symlinked_label_subfolders_are_followed(tmp_path):
    real_images, real_masks = write_pair_folders(tmp_path / "store", n=4, labels=("bright", "dark"))
    images, masks = tmp_path / "images", tmp_path / "masks"
    for linked, real in ((images, real_images), (masks, real_masks)):
        linked.mkdir()
        for label in ("bright", "dark"):
            (linked / label).symlink_to(real / label, target_is_directory=True)
    (images / "bright" / "loop").symlink_to(images, target_is_directory=True)  # a link cycle is walked once
    samples = load_pairs(images, masks)
    assert sorted((s.name, s.label) for s in samples) == [("case000", "bright"), ("case001", "dark"),
                                                           ("case002", "bright"), ("case003", "dark")]


def test_16_single_plane_tiff_mask_with_leading_axis(tmp_path):
    mask = np.zeros((1, 12, 10), np.uint8)
    mask[0, 2:5, 3:6] = 255
    tifffile.imwrite(tmp_path / "m.tif", mask, photometric="minisblack")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), (mask[0] > 0).astype(np.int32))


# ------------------------------------------------------------ 17-18: reproducibility note, messages
def test_17_reproducibility_per_thread_count_is_documented(trained, nnunet_dirs):
    res = invoke(["synthesize", "--help"])
    assert "thread" in " ".join(res.output.split())
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    manifest = json.loads(next(nnunet_dirs["raw"].glob("Dataset501_*/pathar_aug_manifest.json")).read_text())
    (batch,) = manifest["batches"].values()
    assert "thread" in batch["settings"]["reproducibility"]
    # the same command again resumes the same batch: the note is not part of the batch tag
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "cpu"])
    assert res.exit_code == 0 and "0 new synthetic cases" in " ".join(res.output.split()), res.output


def test_18_messages_speak_the_command_line(trained, nnunet_dirs):
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--batch-size", "0"])
    line = assert_user_error(res, "--batch-size")
    assert "commit_every" not in line
    res = invoke(["clean", "--from", "777"])
    line = assert_user_error(res, "777")
    assert "create=True" not in line
    res = invoke(["synthesize", "--model", trained["run"], "--into", "501", "--n", "2", "--device", "cpu",
                  "--no-filter"])  # an exact count: the tiny model's pairs rarely pass the filter
    assert res.exit_code == 0, res.output
    res = invoke(["clean", "--from", "501"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "CleanReport(" not in text and "removed 2 synthetic case(s)" in text and "dataset.json restored" in text
