"""Running nnU-Net v2 in process: verify, plan + preprocess, train one fold, predict, Dice.

Everything goes through nnU-Net's Python API with the trainer class imported directly (no lookup
by name). nnU-Net reads ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` from the
environment when used (see ``paths.nnunet_env``). Preprocessing, verification and augmentation use
spawned worker processes: scripts calling these functions need an ``if __name__ == "__main__":``
guard.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from nnunet_integration.atomic import atomic_write_json
from nnunet_integration.manifest import load_manifest
from nnunet_integration.plans import CPU_PLANS_IDENTIFIER, cpu_plans
from nnunet_integration.trainer import Schedule

DEFAULT_PLANS = "nnUNetPlans"


class DatasetIntegrityError(RuntimeError):
    """nnU-Net's verify_dataset_integrity rejected the dataset."""


def verify(dataset_dir: Path, num_processes: int = 1) -> None:
    """Run ``nnunetv2.experiment_planning.verify_dataset_integrity`` on a raw dataset folder."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    try:
        verify_dataset_integrity(str(dataset_dir), num_processes)
    except (AssertionError, RuntimeError, FileNotFoundError) as e:
        raise DatasetIntegrityError(f"nnU-Net rejected {dataset_dir}: {e}") from e


def _dataset_name(dataset: int | str) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset)


def _env_dir(name: str) -> Path:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"${name} is not set; nnU-Net needs it (see nnunet_integration.paths.nnunet_env)")
    return Path(value)


@contextlib.contextmanager
def _augmentation_workers(num_workers: int | None) -> Iterator[None]:
    """nnU-Net reads its worker count from ``nnUNet_n_proc_DA`` each time it builds loaders."""
    if num_workers is None:
        yield
        return
    saved = os.environ.get("nnUNet_n_proc_DA")
    os.environ["nnUNet_n_proc_DA"] = str(num_workers)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = saved


def plan_and_preprocess(
    dataset_id: int | str,
    configurations: Sequence[str] = ("2d",),
    pinned_plans: dict | None = None,
    num_processes: int = 1,
    clean: bool = True,
    cpu_network: bool | dict = False,
    cpu_plans_identifier: str = CPU_PLANS_IDENTIFIER,
    check_integrity: bool = True,
    fingerprint_samples: int | None = None,
    keep_splits: bool = True,
) -> str:
    """Fingerprint, plan and preprocess a dataset; returns the plans identifier to train with.

    ``pinned_plans``: use these plans (e.g. saved from the real-only dataset) instead of planning,
    so the batch size - which nnU-Net derives from numTraining - is the same for every data mix.
    ``cpu_network``: shrink the network (``plans.cpu_plans``) and save it as ``cpu_plans_identifier``;
    a dict gives ``cpu_plans``' keyword arguments (``base_features``, ``max_features``, ``max_stages``).
    ``clean``: recompute the fingerprint (otherwise an existing one is reused).
    ``fingerprint_samples``: foreground samples for intensity statistics (nnU-Net: 1e8 in total,
    only CT normalisation uses them; fewer is faster).
    ``keep_splits``: if the dataset holds synthetic cases, update splits_final.json so every fold
    trains on them and validates on real cases only (``splits.update_splits``). That puts every
    synthetic case into every fold: write custom folds (``splits.custom_folds``) after this call,
    or pass ``keep_splits=False``.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset, preprocess_dataset
    from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

    name = _dataset_name(dataset_id)
    dataset_num = convert_dataset_name_to_id(name)
    raw_dir = _env_dir("nnUNet_raw") / name
    pre_dir = _env_dir("nnUNet_preprocessed") / name
    if check_integrity:
        verify(raw_dir, num_processes)

    extractor = DatasetFingerprintExtractor(dataset_num, num_processes, verbose=False)
    extractor.show_progress_bar = False
    if fingerprint_samples is not None:
        extractor.num_foreground_voxels_for_intensitystats = int(fingerprint_samples)
    extractor.run(overwrite_existing=clean)

    if pinned_plans is not None:
        plans = json.loads(json.dumps(pinned_plans))
        plans["dataset_name"] = name
        identifier = plans["plans_name"]
        # the planner would copy dataset.json here; the preprocessor reads this copy
        shutil.copy(raw_dir / "dataset.json", pre_dir / "dataset.json")
        atomic_write_json(pre_dir / f"{identifier}.json", plans)
    else:
        _, identifier = plan_experiment_dataset(dataset_num, ExperimentPlanner, overwrite_plans_name=DEFAULT_PLANS)

    if cpu_network:
        plans = json.loads((pre_dir / f"{identifier}.json").read_text())
        for configuration in configurations:
            if configuration in plans["configurations"]:  # e.g. no 3d configurations for 2D data
                options = cpu_network if isinstance(cpu_network, dict) else {}
                plans = cpu_plans(plans, configuration, cpu_plans_identifier, **options)
        identifier = cpu_plans_identifier
        atomic_write_json(pre_dir / f"{identifier}.json", plans)

    preprocess_dataset(dataset_num, identifier, tuple(configurations), [num_processes] * len(configurations),
                       verbose=False, show_progress_bar=False)

    if keep_splits:
        _keep_real_validation(raw_dir, pre_dir.parent)
    return identifier


def _keep_real_validation(raw_dir: Path, preprocessed_root: Path) -> None:
    """If the dataset holds synthetic cases, make the splits validate on real cases only."""
    from nnunet_integration.splits import real_and_synthetic, update_splits

    if not raw_dir.is_dir() or load_manifest(raw_dir) is None:
        return
    real, _ = real_and_synthetic(raw_dir)
    if len(real) < 5:  # e.g. a synthetic-only dataset: nothing real to validate on
        warnings.warn(f"{raw_dir.name} has {len(real)} real cases, too few for real-only 5-fold "
                      "validation; splits_final.json is left to nnU-Net", stacklevel=3)
        return
    update_splits(raw_dir, preprocessed_root)


def model_folder(dataset_id: int | str, plans_identifier: str = DEFAULT_PLANS, configuration: str = "2d",
                 trainer_name: str = "nnUNetTrainerPathar") -> Path:
    """``$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>`` (nnU-Net's naming)."""
    folder = f"{trainer_name}__{plans_identifier}__{configuration}"
    return _env_dir("nnUNet_results") / _dataset_name(dataset_id) / folder


def train_fold(
    dataset_id: int | str,
    fold: int | str,
    schedule: Schedule = Schedule(),
    device: str = "cpu",
    plans_identifier: str = DEFAULT_PLANS,
    configuration: str = "2d",
    trainer_class: type | None = None,
    num_workers: int | None = 1,
    validate: bool = False,
) -> Path:
    """Train one fold with ``trainer.run_training()``; returns the model folder (holding ``fold_<k>``).

    Resumable: a fold with ``checkpoint_final.pth`` is not retrained, one with a latest/best
    checkpoint continues from it. A fold missing from splits_final.json is an error (nnU-Net would
    train on a random split); without a splits file, one with real-only validation is written
    first if the dataset holds synthetic cases. ``num_workers``: augmentation processes (1 on small
    CPUs; 0 runs them in process). ``validate`` runs nnU-Net's full validation afterwards
    (``validation/summary.json``; its export pool size is ``$nnUNet_def_n_proc``).
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_integration.trainer import nnUNetTrainerPathar

    trainer_class = trainer_class or nnUNetTrainerPathar
    name = _dataset_name(dataset_id)
    out = model_folder(name, plans_identifier, configuration, trainer_class.__name__)
    fold_dir = out / f"fold_{fold}"
    if (fold_dir / "checkpoint_final.pth").is_file():
        return out
    resume_from = next((fold_dir / c for c in ("checkpoint_latest.pth", "checkpoint_best.pth")
                        if (fold_dir / c).is_file()), None)

    pre_dir = _env_dir("nnUNet_preprocessed") / name
    splits_file = pre_dir / "splits_final.json"
    if not splits_file.is_file() and os.environ.get("nnUNet_raw"):
        # nnU-Net would now split over all cases, synthetic ones included in validation
        _keep_real_validation(Path(os.environ["nnUNet_raw"]) / name, pre_dir.parent)
    if fold != "all":
        n_folds = len(json.loads(splits_file.read_text())) if splits_file.is_file() else 5
        if not 0 <= int(fold) < n_folds:
            # nnU-Net would silently fall back to a random 80:20 split
            raise ValueError(f"fold {fold} does not exist: {splits_file} has {n_folds} folds")
    plans = load_json(str(pre_dir / f"{plans_identifier}.json"))
    plans["continue_training"] = resume_from is not None  # popped by nnUNetTrainer.__init__
    dataset_json = load_json(str(pre_dir / "dataset.json"))
    trainer = trainer_class(plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
                            device=torch.device(device))
    if hasattr(trainer, "apply_schedule"):
        trainer.apply_schedule(schedule)
    else:
        trainer.num_epochs = schedule.epochs
        trainer.num_iterations_per_epoch = schedule.iterations_per_epoch
        trainer.num_val_iterations_per_epoch = schedule.val_iterations_per_epoch
        trainer.save_every = schedule.save_every
    if resume_from is not None:
        trainer.load_checkpoint(str(resume_from))
    with _augmentation_workers(num_workers):
        trainer.run_training()
        if validate:
            trainer.perform_actual_validation()
    return out


def _load_image(image: np.ndarray | str | Path) -> np.ndarray:
    """(channels, 1, H, W) float32, exactly as NaturalImage2DIO reads an RGB PNG."""
    if isinstance(image, (str, Path)):
        from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

        data, _ = NaturalImage2DIO().read_images([str(image)])
        return data
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"images must be (H, W, C) or (H, W), got shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[:, None]).astype(np.float32)


def predict(
    model_dir: Path,
    images: Sequence[np.ndarray | str | Path],
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "cpu",
    use_mirroring: bool = True,
    tile_step_size: float = 0.5,
) -> list[np.ndarray]:
    """Segment RGB images (arrays HxWx3 or image files) with a trained fold; returns HxW uint8 masks.

    Uses ``nnUNetPredictor.manual_initialization`` with the network built here, so the trainer is
    never looked up by name.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(model_dir)
    plans_manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    ckpt = torch.load(model_dir / f"fold_{fold}" / checkpoint, map_location="cpu", weights_only=False)
    config = plans_manager.get_configuration(ckpt["init_args"]["configuration"])
    # the trainers used here keep nnUNetTrainer's network builder
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"])
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans_manager, config, [ckpt["network_weights"]], dataset_json,
                                    ckpt["trainer_name"], ckpt.get("inference_allowed_mirroring_axes"))
    masks = []
    for image in images:
        seg = predictor.predict_single_npy_array(_load_image(image), {"spacing": [999, 1, 1]})
        masks.append(np.asarray(seg)[0].astype(np.uint8))
    return masks
