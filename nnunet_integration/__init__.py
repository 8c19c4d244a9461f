"""The nnU-Net v2 side of pathar-aug, shared by the CLI and the benchmarks (it imports nothing of pathar_aug).

- ``paths``: resolve ``--into`` (id / name / path) to a raw dataset folder, create it if asked.
- ``dataset``: every write into a dataset (real pairs, synthetic pairs; kill-safe, one lock).
- ``cases``: read a dataset: its cases, real / synthetic, their condition labels, committed ids.
- ``manifest``: the record of synthetic cases beside dataset.json (and of real cases' labels).
- ``names``: the one name sanitiser (case-name parts, file names).
- ``clean``: remove exactly the synthetic cases, restore dataset.json and splits.
- ``splits``: splits_final.json with real-only validation (nnU-Net's folds, or custom ones).
- ``plans``: a smaller network for CPU training.
- ``trainer``: a short-schedule nnUNetTrainer subclass.
- ``runner``: verify, plan + preprocess, train a fold, predict (imports torch).

Names are imported lazily so that ``import nnunet_integration`` does not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "resolve_dataset": "paths",
    "nnunet_env": "paths",
    "DatasetResolutionError": "paths",
    "make_dataset_json": "paths",
    "write_cases": "dataset",
    "write_chunks": "dataset",
    "write_real_cases": "dataset",
    "SyntheticCasesPresent": "dataset",
    "case_labels": "cases",
    "committed_ids": "cases",
    "safe_name": "names",
    "recover": "dataset",
    "list_cases": "cases",
    "real_cases": "cases",
    "synthetic_cases": "cases",
    "check_compatible": "cases",
    "IncompatibleDatasetError": "cases",
    "WriteReport": "dataset",
    "load_manifest": "manifest",
    "MANIFEST_NAME": "manifest",
    "SYNTHETIC_PREFIX": "manifest",
    "ManifestError": "manifest",
    "clean_synthetic": "clean",
    "CleanReport": "clean",
    "write_splits": "splits",
    "update_splits": "splits",
    "custom_folds": "splits",
    "read_splits": "splits",
    "crossval_folds": "splits",
    "cpu_plans": "plans",
    "Schedule": "trainer",
    "nnUNetTrainerPathar": "trainer",
    "trainer_search_path": "trainer",
    "verify": "runner",
    "plan_and_preprocess": "runner",
    "train_fold": "runner",
    "model_folder": "runner",
    "predict": "runner",
    "DatasetIntegrityError": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nnunet_integration' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nnunet_integration.{module}"), name)


def __dir__() -> list[str]:
    return __all__
