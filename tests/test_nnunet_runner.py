"""nnunet_integration's runner against real nnU-Net v2 on CPU: plan, splits via do_split, train, predict."""
from __future__ import annotations

import hashlib
import json
import os
import types

os.environ.setdefault("nnUNet_def_n_proc", "1")  # read when nnunetv2 is imported
os.environ.setdefault("nnUNet_n_proc_DA", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class  # noqa: E402
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: E402
from nnunetv2.utilities.crossval_split import generate_crossval_split  # noqa: E402
from PIL import Image  # noqa: E402

from nnunet_integration.dataset import write_cases  # noqa: E402
from nnunet_integration.paths import nnunet_env  # noqa: E402
from nnunet_integration.runner import plan_and_preprocess, predict, train_fold  # noqa: E402
from pathar_aug.metrics import binary_dice as dice  # noqa: E402
from nnunet_integration.splits import custom_folds, read_splits, write_splits  # noqa: E402
from nnunet_integration.toy import disc_case, make_real_dataset  # noqa: E402
from nnunet_integration.trainer import Schedule, nnUNetTrainerPathar, trainer_search_path  # noqa: E402

SHORT = Schedule(epochs=2, iterations_per_epoch=2, val_iterations_per_epoch=1)
DATASET = "Dataset601_Runner"


def synthetic(n: int, seed: int, start: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(start, start + n):
        image, mask = disc_case(rng, 64)
        yield f"g{i:03d}", image, mask


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """10 real + 4 synthetic 64x64 cases, planned with the CPU network and preprocessed."""
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: root / k for k in ("raw", "preprocessed", "results")}
    with nnunet_env(dirs["raw"], dirs["preprocessed"], dirs["results"]):
        dataset = dirs["raw"] / DATASET
        make_real_dataset(dataset, 10, seed=0)
        real_files = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in dataset.rglob("*.png")}
        syn = write_cases(dataset, synthetic(4, seed=1), settings={"model": "toy"}).written
        identifier = plan_and_preprocess(601, cpu_network=True, num_processes=1, fingerprint_samples=100_000)
        yield types.SimpleNamespace(dataset=dataset, dirs=dirs, plans_identifier=identifier, synthetic=syn,
                                    real=[f"real{i:03d}" for i in range(10)], real_files=real_files)


def nnunet_split(study, fold: int) -> tuple[list[str], list[str]]:
    """The folds as nnU-Net's own trainer loads them."""
    pre = study.dirs["preprocessed"] / DATASET
    plans = json.loads((pre / f"{study.plans_identifier}.json").read_text())
    plans["continue_training"] = False
    trainer = nnUNetTrainer(plans=plans, configuration="2d", fold=fold,
                            dataset_json=json.loads((pre / "dataset.json").read_text()), device=torch.device("cpu"))
    train, val = trainer.do_split()
    return [str(c) for c in train], [str(c) for c in val]


def test_cpu_plans_and_preprocessed_cases(study):
    pre = study.dirs["preprocessed"] / DATASET
    plans = json.loads((pre / "nnUNetPlans_cpu.json").read_text())
    assert study.plans_identifier == "nnUNetPlans_cpu" == plans["plans_name"]
    config = plans["configurations"]["2d"]
    assert config["patch_size"] == [64, 64]  # patch = tile size
    assert config["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 256]
    assert config["data_identifier"] == "nnUNetPlans_cpu_2d"
    folder = str(pre / "nnUNetPlans_cpu_2d")
    identifiers = sorted(infer_dataset_class(folder).get_identifiers(folder))
    assert identifiers == sorted(study.real + study.synthetic)
    for path, digest in study.real_files.items():  # real cases untouched by writing and planning
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_nnunet_do_split_validates_on_real_cases_only(study):
    with nnunet_env(*study.dirs.values()):
        reference = generate_crossval_split(study.real, seed=12345, n_splits=5)
        for fold in range(5):
            train, val = nnunet_split(study, fold)
            assert val == list(reference[fold]["val"])  # nnU-Net's real-only folds
            assert set(study.synthetic) <= set(train)
            assert set(train) == set(study.real) - set(val) | set(study.synthetic)


def test_custom_folds_through_do_split(study):
    with nnunet_env(*study.dirs.values()):
        val = study.real[:3]
        folds = [{"train": study.real[3:], "val": val}, {"train": study.real[3:] + study.synthetic, "val": val}]
        custom_folds(study.dataset, folds)
        for k, fold in enumerate(folds):
            assert nnunet_split(study, k) == (fold["train"], fold["val"])
        write_splits(study.dataset)  # back to the default folds for the tests below
        assert len(read_splits(study.dataset)) == 5


@pytest.fixture(scope="module")
def trained(study):
    with nnunet_env(*study.dirs.values()):
        return train_fold(601, 0, SHORT, plans_identifier=study.plans_identifier)


def test_train_predict_and_dice_on_cpu(study, trained, tmp_path):
    assert trained.name == "nnUNetTrainerPathar__nnUNetPlans_cpu__2d"
    final = trained / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == "nnUNetTrainerPathar" and ckpt["current_epoch"] == SHORT.epochs

    rng = np.random.default_rng(5)
    pairs = [disc_case(rng, 64) for _ in range(3)]
    Image.fromarray(pairs[2][0]).save(tmp_path / "test_0000.png")
    masks = predict(trained, [pairs[0][0], pairs[1][0], tmp_path / "test_0000.png"])
    scores = []
    for mask, (_, gt) in zip(masks, pairs):
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 1}
        scores.append(dice(mask, gt))
    assert all(0.0 <= s <= 1.0 for s in scores)

    # a finished fold is not retrained
    stamp = final.stat().st_mtime_ns
    with nnunet_env(*study.dirs.values()):
        assert train_fold(601, 0, SHORT, plans_identifier=study.plans_identifier) == trained
    assert final.stat().st_mtime_ns == stamp


def test_snapshots_keep_the_weights_after_the_chosen_epochs(study):
    from nnunet_integration.trainer import snapshot_path

    assert Schedule(epochs=40).curve_epochs() == (10, 20, 30, 40)
    assert Schedule(epochs=2).curve_epochs() == (1, 2)
    with pytest.raises(ValueError, match="snapshot_epochs"):
        Schedule(epochs=2, snapshot_epochs=(3,))
    schedule = Schedule(epochs=2, iterations_per_epoch=1, val_iterations_per_epoch=1, snapshot_epochs=(1, 2))
    with nnunet_env(*study.dirs.values()):
        out = train_fold(601, 2, schedule, plans_identifier=study.plans_identifier, num_workers=0)
    fold = out / "fold_2"
    first, second, final = (torch.load(path, map_location="cpu", weights_only=False)
                            for path in (snapshot_path(fold, 1), snapshot_path(fold, 2), fold / "checkpoint_final.pth"))
    assert first["current_epoch"] == 1 and second["current_epoch"] == 2
    name = next(iter(final["network_weights"]))
    assert torch.equal(second["network_weights"][name], final["network_weights"][name])
    assert not torch.equal(first["network_weights"][name], final["network_weights"][name])


def test_dice():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = 1
    assert dice(a, b) == 0.0
    b[0, 1:3] = 1
    assert dice(a, b) == pytest.approx(0.5)


def test_trainer_found_by_name_via_ext_trainer(study, trained, monkeypatch):
    """nnU-Net's own lookup (used by nnUNetv2_predict and -tr) finds the trainer; predictions agree."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(trainer_search_path()))
    assert recursive_find_trainer_class_by_name("nnUNetTrainerPathar") is nnUNetTrainerPathar

    image, _ = disc_case(np.random.default_rng(9), 64)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained), use_folds=(0,))
    theirs = predictor.predict_single_npy_array(image.transpose(2, 0, 1)[:, None].astype(np.float32),
                                                {"spacing": [999, 1, 1]})
    np.testing.assert_array_equal(predict(trained, [image])[0], theirs[0])


def test_training_resumes_from_latest_checkpoint(study):
    with nnunet_env(*study.dirs.values()):
        out = train_fold(601, 1, Schedule(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1),
                         plans_identifier=study.plans_identifier, num_workers=0)
        fold = out / "fold_1"
        # pretend the run was stopped after epoch 1 of 2
        (fold / "checkpoint_final.pth").rename(fold / "checkpoint_latest.pth")
        train_fold(601, 1, SHORT, plans_identifier=study.plans_identifier, num_workers=0)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2
    assert len(ckpt["logging"]["train_losses"]) == 2  # one epoch loaded, one trained
    assert not (fold / "checkpoint_latest.pth").exists()


def test_pinned_plans_after_adding_synthetic_cases(study):
    """A later data mix: more synthetic cases, the same plans (batch size), splits updated."""
    pre = study.dirs["preprocessed"] / DATASET
    pinned = json.loads((pre / f"{study.plans_identifier}.json").read_text())
    with nnunet_env(*study.dirs.values()):
        more = write_cases(study.dataset, synthetic(3, seed=2), settings={"model": "toy2"}).written
        identifier = plan_and_preprocess(601, pinned_plans=pinned, num_processes=1, clean=False,
                                         check_integrity=False)
        assert identifier == study.plans_identifier
        assert json.loads((pre / f"{identifier}.json").read_text()) == pinned
        folder = str(pre / "nnUNetPlans_cpu_2d")
        assert set(more) <= set(infer_dataset_class(folder).get_identifiers(folder))
        for k in range(5):
            train, val = nnunet_split(study, k)
            assert set(study.synthetic + more) <= set(train)
            assert set(val) <= set(study.real)


def test_missing_splits_are_written_real_only_and_unknown_folds_refused(study):
    with nnunet_env(*study.dirs.values()):
        splits = study.dirs["preprocessed"] / DATASET / "splits_final.json"
        splits.unlink()
        with pytest.raises(ValueError, match="fold 5 does not exist"):
            train_fold(601, 5, SHORT, plans_identifier=study.plans_identifier)
        folds = json.loads(splits.read_text())  # written before nnU-Net could make its own
        assert sorted(c for f in folds for c in f["val"]) == study.real
