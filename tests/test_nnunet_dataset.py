"""nnunet_integration's dataset side against real nnU-Net v2: resolution, writing, kill-safety, clean."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

os.environ.setdefault("nnUNet_def_n_proc", "1")  # read when nnunetv2 is imported
os.environ.setdefault("nnUNet_n_proc_DA", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import save_json as nnunet_save_json  # noqa: E402
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO  # noqa: E402
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402
from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets  # noqa: E402

from nnunet_integration import atomic  # noqa: E402
from nnunet_integration.clean import clean_synthetic  # noqa: E402
from nnunet_integration.dataset import (  # noqa: E402
    IncompatibleDatasetError,
    list_cases,
    real_cases,
    recover,
    synthetic_cases,
    write_cases,
)
from nnunet_integration.manifest import MANIFEST_NAME, ManifestError, case_files, load_manifest  # noqa: E402
from nnunet_integration.paths import DatasetResolutionError, resolve_dataset  # noqa: E402
from nnunet_integration.runner import DatasetIntegrityError, verify  # noqa: E402
from nnunet_integration.splits import custom_folds, read_splits, update_splits, write_splits  # noqa: E402
from nnunet_integration.toy import disc_case, make_real_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent




def synthetic(n: int, seed: int = 1, size: int = 64, start: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        image, mask = disc_case(rng, size)
        yield f"g{i:04d}", image, mask


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def nnunet_view(dataset_dir: Path) -> dict:
    """The checks of verify_dataset_integrity that a torn write would break, in process.

    Case list from nnU-Net's own get_filenames_of_train_images_and_targets; numTraining must match;
    every image and label must exist and read with NaturalImage2DIO; labels only 0/1.
    """
    dj = json.loads((dataset_dir / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(dataset_dir), dj)
    assert len(cases) == dj["numTraining"]
    rw = NaturalImage2DIO()
    for case in cases.values():
        image, _ = rw.read_images(case["images"])
        seg, _ = rw.read_seg(case["label"])
        assert image.shape[0] == 3 and image.shape[1:] == seg.shape[1:]
        assert set(np.unique(seg).tolist()) <= {0, 1}
    return cases


def manifest_invariant(dataset_dir: Path) -> None:
    """Every synthetic case nnU-Net sees and every synthetic file on disk is in the manifest."""
    manifest = load_manifest(dataset_dir)
    listed = set(list_cases(dataset_dir))
    on_disk = {p.name for sub in ("imagesTr", "labelsTr") for p in (dataset_dir / sub).iterdir()
               if p.name.startswith("pathar_")}
    ours = set(manifest.cases) if manifest else set()
    assert {c for c in listed if c.startswith("pathar_")} <= ours
    owned = {Path(rel).name + suffix for c in ours for rel in case_files(c) for suffix in ("", ".tmp")}
    assert on_disk <= owned


# ----------------------------------------------------------------------------- resolution


def test_resolve_by_id_name_and_path(nnunet_dirs):
    raw = nnunet_dirs["raw"]
    created = resolve_dataset("501", create=True)
    assert created == raw / "Dataset501_PatharAug"
    dj = json.loads((created / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dj["labels"] == {"background": 0, "nucleus": 1}
    assert dj["numTraining"] == 0 and dj["file_ending"] == ".png"
    assert (created / "imagesTr").is_dir() and (created / "labelsTr").is_dir()

    assert resolve_dataset("501") == created
    assert resolve_dataset(501) == created
    assert resolve_dataset("Dataset501_PatharAug") == created
    assert resolve_dataset(str(created)) == created
    assert resolve_dataset(created) == created
    named = resolve_dataset("Dataset502_Nuclei", create=True)
    assert named == raw / "Dataset502_Nuclei" and (named / "dataset.json").is_file()
    elsewhere = resolve_dataset(nnunet_dirs["results"].parent / "mine" / "Dataset777_X", create=True)
    assert (elsewhere / "dataset.json").is_file()


def test_resolve_with_explicit_raw_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    made = resolve_dataset("12", nnunet_raw=tmp_path, create=True, default_name="Nuc")
    assert made == tmp_path / "Dataset012_Nuc"
    assert resolve_dataset("Dataset012_Nuc", tmp_path) == made


@pytest.mark.parametrize("into, create, message", [
    ("999", False, "no dataset with id 999"),
    ("Dataset999_Nope", False, "does not exist"),
    ("50x", True, "cannot read"),
    ("1000", True, "out of range"),
    ("0", True, "out of range"),
    ("Dataset5_short", True, "3-digit id"),
    ("Dataset501", True, "3-digit id"),
    ("Dataset501_Other", True, "already used by Dataset501_Nuclei"),
    ("Dataset501_Other", False, "already used by Dataset501_Nuclei"),
])
def test_resolve_errors(nnunet_dirs, into, create, message):
    resolve_dataset("Dataset501_Nuclei", create=True)
    with pytest.raises(DatasetResolutionError, match=message):
        resolve_dataset(into, create=create)


def test_resolve_error_cases_needing_setup(nnunet_dirs, monkeypatch, tmp_path):
    # an id taken in nnUNet_preprocessed only is taken for nnU-Net too
    (nnunet_dirs["preprocessed"] / "Dataset600_Old").mkdir()
    with pytest.raises(DatasetResolutionError, match="already used by Dataset600_Old"):
        resolve_dataset("Dataset600_New", create=True)
    # a path must be named like an nnU-Net dataset
    with pytest.raises(DatasetResolutionError, match="DatasetXXX_Name"):
        resolve_dataset(str(tmp_path / "plainfolder"), create=True)
    # a folder with files but no dataset.json is not silently adopted
    odd = nnunet_dirs["raw"] / "Dataset610_Odd"
    (odd / "imagesTr").mkdir(parents=True)
    (odd / "imagesTr" / "x_0000.png").write_bytes(b"not ours")
    with pytest.raises(DatasetResolutionError, match="no dataset.json"):
        resolve_dataset("610", create=True)
    # ids and names need a raw folder
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(DatasetResolutionError, match="nnUNet_raw"):
        resolve_dataset("501", create=True)
    with pytest.raises(DatasetResolutionError, match="nnUNet_raw"):
        resolve_dataset("Dataset501_Nuclei")


# ----------------------------------------------------------------------------- writing


def test_fresh_dataset_write_passes_verify(nnunet_dirs):
    dataset = resolve_dataset("501", create=True)
    report = write_cases(dataset, synthetic(6), settings={"model": "pathar-tiny", "temperature": 1.0})
    assert report.written == [f"pathar_{report.batch}_g{i:04d}" for i in range(6)]
    verify(dataset)  # nnU-Net's verify_dataset_integrity
    cases = nnunet_view(dataset)
    assert sorted(cases) == sorted(report.written) == synthetic_cases(dataset)
    assert real_cases(dataset) == []

    name = report.written[0]
    image, _ = NaturalImage2DIO().read_images([str(dataset / "imagesTr" / f"{name}_0000.png")])
    seg, _ = NaturalImage2DIO().read_seg(str(dataset / "labelsTr" / f"{name}.png"))
    _, ref_image, ref_mask = next(synthetic(1))
    assert image.shape == (3, 1, 64, 64) and seg.shape == (1, 1, 64, 64)
    np.testing.assert_array_equal(image[:, 0].transpose(1, 2, 0), ref_image)
    np.testing.assert_array_equal(seg[0, 0], ref_mask)

    manifest = load_manifest(dataset)
    assert manifest.batches[report.batch]["settings"] == {"model": "pathar-tiny", "temperature": 1.0}
    assert set(manifest.names("committed")) == set(report.written)


def test_list_cases_matches_nnunet_folder_scan(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset503_Real"
    make_real_dataset(dataset, 5)
    dj = json.loads((dataset / "dataset.json").read_text())
    ours = {k: {"images": [str(dataset / i) for i in v["images"]], "label": str(dataset / v["label"])}
            for k, v in list_cases(dataset).items()}
    theirs = get_filenames_of_train_images_and_targets(str(dataset), dj)
    assert ours == {k: {"images": list(v["images"]), "label": v["label"]} for k, v in theirs.items()}


def test_existing_real_dataset_keeps_real_files_and_resumes(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset504_Real"
    make_real_dataset(dataset, 10)
    before = snapshot(dataset)
    first = write_cases(dataset, synthetic(3), settings={"model": "a"}, commit_every=2)
    after = snapshot(dataset)
    for rel, digest in before.items():
        if rel != "dataset.json":
            assert after[rel] == digest, f"real file {rel} changed"
    assert real_cases(dataset) == [f"real{i:03d}" for i in range(10)]
    assert len(nnunet_view(dataset)) == 13

    # the same command again resumes: committed cases are skipped, the rest added
    again = write_cases(dataset, synthetic(5), settings={"model": "a"})
    assert again.batch == first.batch
    assert again.skipped == first.written and len(again.written) == 2
    assert len(synthetic_cases(dataset)) == 5
    # other settings -> another batch, no collision with the first one
    other = write_cases(dataset, synthetic(2), settings={"model": "b"})
    assert other.batch != first.batch and len(other.written) == 2
    verify(dataset)
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 17


def test_collisions_and_bad_input_are_refused(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset505_Real"
    make_real_dataset(dataset, 5)
    write_cases(dataset, synthetic(2), batch="b1")
    state = snapshot(dataset)

    # a stray file at a synthetic name is never overwritten
    stray = dataset / "labelsTr" / "pathar_b1_g0007.png"
    stray.write_bytes(b"stray")
    with pytest.raises(FileExistsError, match="not ours"):
        write_cases(dataset, synthetic(1, start=7), batch="b1")
    assert stray.read_bytes() == b"stray"
    stray.unlink()

    _, image, mask = next(synthetic(1))
    with pytest.raises(ValueError, match="twice"):
        write_cases(dataset, [("x1", image, mask), ("x1", image, mask)], batch="b1")
    with pytest.raises(ValueError, match="uint8"):
        write_cases(dataset, [("x2", image.astype(np.float32), mask)], batch="b1")
    with pytest.raises(ValueError, match="shape"):
        write_cases(dataset, [("x3", image, mask[:10])], batch="b1")
    with pytest.raises(ValueError, match="mask values"):
        write_cases(dataset, [("x4", image, mask * 3)], batch="b1")
    with pytest.raises(ValueError, match="case id"):
        write_cases(dataset, [("bad/name", image, mask)], batch="b1")
    with pytest.raises(ManifestError, match="other settings"):
        write_cases(dataset, synthetic(1), settings={"model": "changed"}, batch="b1")
    assert snapshot(dataset) == state  # none of the refused calls wrote anything

    # 0/255 masks are the common PNG convention and become 0/1
    write_cases(dataset, [("m255", image, mask * 255)], batch="b1")
    seg, _ = NaturalImage2DIO().read_seg(str(dataset / "labelsTr" / "pathar_b1_m255.png"))
    np.testing.assert_array_equal(seg[0, 0], mask)


def test_real_case_with_reserved_prefix_is_refused(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset506_Real"
    make_real_dataset(dataset, 3, prefix="pathar_real")
    state = snapshot(dataset)
    with pytest.raises(IncompatibleDatasetError, match="reserved"):
        write_cases(dataset, synthetic(1))
    assert snapshot(dataset) == state


@pytest.mark.parametrize("change, message", [
    ({"file_ending": ".jpg"}, "file_ending"),  # no 2D reader/writer of nnU-Net takes it
    ({"file_ending": ".nii.gz", "overwrite_image_reader_writer": "NibabelIO"}, "NibabelIO"),
    ({"channel_names": {"0": "R"}}, "channel_names has 1"),  # the real cases are RGB
    ({"channel_names": {"0": "R", "1": "G", "2": "B", "3": "A"}}, "channel_names has 4"),
    ({"labels": {"background": 0, "tumour": 2}}, "lack background 0 and nucleus 1"),
    ({"numTraining": 7}, "numTraining=7"),
])
def test_incompatible_dataset_json_is_refused_with_nothing_written(nnunet_dirs, change, message):
    dataset = nnunet_dirs["raw"] / "Dataset507_Real"
    make_real_dataset(dataset, 3)
    dj = json.loads((dataset / "dataset.json").read_text())
    dj.update(change)
    (dataset / "dataset.json").write_text(json.dumps(dj))
    state = snapshot(dataset)
    with pytest.raises(IncompatibleDatasetError, match=message):
        write_cases(dataset, synthetic(2))
    assert snapshot(dataset) == state
    assert not (dataset / MANIFEST_NAME).exists()


def test_real_cases_added_after_synthetic_ones_are_not_silently_ignored(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset508_Real"
    make_real_dataset(dataset, 3)
    write_cases(dataset, synthetic(1))
    make_real_dataset(nnunet_dirs["raw"] / "Dataset509_Other", 1, prefix="late")
    for sub, name in (("imagesTr", "late000_0000.png"), ("labelsTr", "late000.png")):
        (dataset / sub / name).write_bytes((nnunet_dirs["raw"] / "Dataset509_Other" / sub / name).read_bytes())
    with pytest.raises(ManifestError, match="not in dataset.json"):
        write_cases(dataset, synthetic(1, start=5))


def test_verify_reports_a_broken_dataset(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset510_Real"
    make_real_dataset(dataset, 3)
    (dataset / "labelsTr" / "real001.png").unlink()
    with pytest.raises(DatasetIntegrityError):
        verify(dataset)


# ----------------------------------------------------------------------------- kill-safety


class Crash(BaseException):
    """Stands in for SIGKILL: raised instead of performing the n-th visible file operation."""


def _crash_on(monkeypatch, n: int) -> list[int]:
    """Make the n-th rename / link / unlink of nnunet_integration raise Crash instead of running.

    All of the package's visible file changes go through ``nnunet_integration.atomic``'s ``os``.
    """
    calls = [0]

    def wrap(real):
        def op(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise Crash()
            return real(*args, **kwargs)
        return op

    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    for attr in ("replace", "link", "unlink"):
        setattr(fake_os, attr, wrap(getattr(os, attr)))
    monkeypatch.setattr(atomic, "os", fake_os)
    return calls


def _count_ops(monkeypatch, fn) -> int:
    with monkeypatch.context() as m:
        calls = _crash_on(m, -1)
        fn()
        return calls[0]


def test_crash_at_every_step_of_write_and_clean_leaves_a_valid_dataset(nnunet_dirs, monkeypatch):
    """Interrupt write_cases / clean_synthetic before each of their file operations in turn."""
    template = nnunet_dirs["raw"] / "Dataset511_Real"
    make_real_dataset(template, 4)
    original = snapshot(template)

    def fresh(tag: str) -> Path:
        d = nnunet_dirs["raw"] / f"Dataset{512 + len(list(nnunet_dirs['raw'].iterdir()))}_{tag}"
        d.mkdir()
        for rel in original:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes((template / rel).read_bytes())
        return d

    def write(d):
        return write_cases(d, synthetic(5), settings={"m": 1}, commit_every=2)

    probe = fresh("probe")
    n_write = _count_ops(monkeypatch, lambda: write(probe))
    n_clean = _count_ops(monkeypatch, lambda: clean_synthetic(probe))
    assert snapshot(probe) == original
    assert n_write > 15 and n_clean > 10

    seen = {"tmp left": 0, "pending left": 0, "finished": 0, "removed": 0}
    for k in range(1, n_write + 1):
        d = fresh("w")
        with monkeypatch.context() as m:
            _crash_on(m, k)
            with pytest.raises(Crash):
                write(d)
        assert len(nnunet_view(d)) >= 4, f"crash before write op {k}"
        manifest_invariant(d)
        seen["tmp left"] += bool(list(d.rglob("*.tmp")))
        seen["pending left"] += bool(load_manifest(d) and load_manifest(d).names("pending"))
        report = write(d)  # the rerun completes it
        seen["finished"] += bool(report.recovered)
        seen["removed"] += bool(report.removed_leftovers)
        assert len(nnunet_view(d)) == 9, f"rerun after crash before write op {k}"
        assert len(synthetic_cases(d)) == 5
        assert report.batch == load_manifest(d).cases[synthetic_cases(d)[0]]["batch"]
        assert not list(d.rglob("*.tmp"))

    assert all(seen.values()), seen  # every kind of leftover was produced and settled

    for k in range(1, n_clean + 1):
        d = fresh("c")
        write(d)
        with monkeypatch.context() as m:
            _crash_on(m, k)
            with pytest.raises(Crash):
                clean_synthetic(d)
        nnunet_view(d)
        manifest_invariant(d)
        clean_synthetic(d)
        assert snapshot(d) == original, f"clean rerun after crash before clean op {k}"


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from pathlib import Path
    from nnunet_integration.dataset import write_cases
    from nnunet_integration.toy import disc_case

    def cases(n):
        rng = np.random.default_rng(7)
        for i in range(n):
            image, mask = disc_case(rng, 96)
            yield f"k{i:04d}", image, mask

    write_cases(Path(sys.argv[1]), cases(int(sys.argv[2])), settings={"run": "kill"}, commit_every=4)
""")


def _run_and_kill(dataset: Path, n: int, after_cases: int, delay: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(dataset), str(n)], cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads((dataset / "dataset.json").read_text())["numTraining"] >= after_cases:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.01)
        time.sleep(delay)
        assert proc.poll() is None, "the writer finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_mid_write_leaves_a_dataset_nnunet_accepts(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset530_Real"
    make_real_dataset(dataset, 5)
    n = 400
    _run_and_kill(dataset, n, after_cases=5 + 20, delay=0.037)
    count1 = json.loads((dataset / "dataset.json").read_text())["numTraining"]
    assert 25 <= count1 < 5 + n
    verify(dataset)
    manifest_invariant(dataset)

    _run_and_kill(dataset, n, after_cases=count1 + 40, delay=0.011)  # the rerun is killed too
    count2 = json.loads((dataset / "dataset.json").read_text())["numTraining"]
    assert count1 < count2 < 5 + n
    verify(dataset)
    manifest_invariant(dataset)

    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dataset), str(n)], cwd=REPO)
    assert done.returncode == 0
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 5 + n
    assert len(synthetic_cases(dataset)) == n and len(real_cases(dataset)) == 5
    assert not list(dataset.rglob("*.tmp"))
    assert recover(dataset).recovered == []
    verify(dataset)


# ----------------------------------------------------------------------------- clean and splits


def test_clean_restores_dataset_json_and_splits_exactly(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset540_Real"
    make_real_dataset(dataset, 8)
    original = snapshot(dataset)
    # splits as nnU-Net itself writes them for the real-only dataset
    pre = nnunet_dirs["preprocessed"] / dataset.name
    pre.mkdir()
    real = sorted(list_cases(dataset))
    nnunet_save_json(generate_crossval_split(real, seed=12345, n_splits=5), str(pre / "splits_final.json"))
    splits_before = (pre / "splits_final.json").read_bytes()

    written = write_cases(dataset, synthetic(4), settings={"m": "x"}).written
    update_splits(dataset)
    folds = read_splits(dataset)
    reference = generate_crossval_split(real, seed=12345, n_splits=5)
    for fold, ref in zip(folds, reference):
        assert fold["val"] == list(ref["val"])  # the same real validation cases as before
        assert fold["train"] == list(ref["train"]) + sorted(written)

    report = clean_synthetic(dataset)
    assert report.removed_cases == sorted(written) and report.removed_files == 8
    assert report.splits == "restored"
    assert (pre / "splits_final.json").read_bytes() == splits_before
    assert snapshot(dataset) == original  # dataset.json byte for byte, real files, no manifest
    assert clean_synthetic(dataset).removed_cases == []  # nothing left to do


def test_splits_created_here_are_stripped_on_clean(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset541_Real"
    make_real_dataset(dataset, 6)
    write_cases(dataset, synthetic(3))
    path = write_splits(dataset)
    folds = json.loads(path.read_text())
    real = [f"real{i:03d}" for i in range(6)]
    assert sorted(c for f in folds for c in f["val"]) == real
    assert all(len([c for c in f["train"] if c.startswith("pathar_")]) == 3 for f in folds)

    report = clean_synthetic(dataset)
    assert report.splits == "updated"
    stripped = json.loads(path.read_text())
    assert [f["val"] for f in stripped] == [f["val"] for f in folds]
    assert not any(c.startswith("pathar_") for f in stripped for c in f["train"])


def test_custom_folds_validation(nnunet_dirs):
    dataset = nnunet_dirs["raw"] / "Dataset542_Real"
    make_real_dataset(dataset, 6)
    syn = write_cases(dataset, synthetic(2)).written
    real = [f"real{i:03d}" for i in range(6)]
    val = real[:2]
    path = custom_folds(dataset, [{"train": real[2:], "val": val}, {"train": real[2:] + syn, "val": val}])
    assert json.loads(path.read_text())[1] == {"train": real[2:] + syn, "val": val}
    with pytest.raises(ValueError, match="not in the dataset"):
        custom_folds(dataset, [{"train": ["nope"], "val": val}])
    with pytest.raises(ValueError, match="synthetic"):
        custom_folds(dataset, [{"train": real, "val": syn}])
    custom_folds(dataset, [{"train": real, "val": syn}], allow_synthetic_val=True)
    with pytest.raises(ValueError, match="keys"):
        custom_folds(dataset, [{"train": real}])
