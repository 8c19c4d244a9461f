"""``splits_final.json``: every fold trains on real + synthetic cases and validates on real ones only.

nnU-Net reads ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json`` and creates it only when
it is missing, so cases added later join no fold, and a split made after synthetic cases were
preprocessed would validate on synthetic images. The folds here are nnU-Net's own
(``generate_crossval_split``: KFold, shuffle, seed 12345 over the sorted real cases), so the
validation cases are exactly those of a real-only nnU-Net run and results stay comparable.

Before the first change of a splits file the manifest records its original text (or that it did
not exist), so ``clean_synthetic`` can restore it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_integration.atomic import atomic_write_json, exclusive_dir_lock
from nnunet_integration.dataset import list_cases
from nnunet_integration.manifest import COMMITTED, SYNTHETIC_PREFIX, load_manifest, save_manifest
from nnunet_integration.paths import preprocessed_dir

SPLITS_NAME = "splits_final.json"
Fold = dict[str, list[str]]


def splits_path(dataset_dir: Path, nnunet_preprocessed: Path | str | None = None) -> Path:
    folder = preprocessed_dir(dataset_dir, nnunet_preprocessed)
    if folder is None:
        raise ValueError("where nnU-Net's preprocessed data lives is unknown: set $nnUNet_preprocessed "
                         "or pass nnunet_preprocessed")
    return folder / SPLITS_NAME


def read_splits(dataset_dir: Path, nnunet_preprocessed: Path | str | None = None) -> list[Fold] | None:
    path = splits_path(dataset_dir, nnunet_preprocessed)
    return json.loads(path.read_text()) if path.is_file() else None


def real_and_synthetic(dataset_dir: Path) -> tuple[list[str], list[str]]:
    """(real cases, committed synthetic cases) currently in the dataset, each sorted."""
    listed = list_cases(dataset_dir)
    manifest = load_manifest(dataset_dir)
    ours = set(manifest.cases) if manifest else set()
    committed = set(manifest.names(COMMITTED)) if manifest else set()
    real = sorted(c for c in listed if c not in ours)
    synthetic = sorted(c for c in listed if c in committed)
    return real, synthetic


def crossval_folds(real: Sequence[str], synthetic: Sequence[str], n_splits: int = 5, seed: int = 12345) -> list[Fold]:
    """nnU-Net's k-fold over the real cases; every fold's training set also gets all synthetic cases."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    real = sorted(real)  # nnU-Net sorts its identifiers before splitting
    if len(real) < n_splits:
        raise ValueError(f"{n_splits}-fold cross-validation needs at least {n_splits} real cases, found {len(real)}")
    folds = generate_crossval_split(real, seed=seed, n_splits=n_splits)
    synthetic = sorted(synthetic)
    return [{"train": [str(c) for c in f["train"]] + synthetic, "val": [str(c) for c in f["val"]]} for f in folds]


def _save(dataset_dir: Path, path: Path, folds: list[Fold]) -> Path:
    manifest = load_manifest(dataset_dir)
    if manifest is not None and manifest.splits is None:
        # remember what was there before the first change (None: nnU-Net had not made one yet)
        original = path.read_text(encoding="utf-8") if path.is_file() else None
        manifest.splits = {"file": str(path.absolute()), "original": original}
        save_manifest(dataset_dir, manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, folds)
    return path


def write_splits(
    dataset_dir: Path,
    nnunet_preprocessed: Path | str | None = None,
    n_splits: int = 5,
    seed: int = 12345,
) -> Path:
    """Write fresh nnU-Net-style folds over the real cases, synthetic cases in every training set."""
    dataset_dir = Path(dataset_dir)
    path = splits_path(dataset_dir, nnunet_preprocessed)
    with exclusive_dir_lock(dataset_dir, "writing"):
        real, synthetic = real_and_synthetic(dataset_dir)
        return _save(dataset_dir, path, crossval_folds(real, synthetic, n_splits, seed))


def update_splits(dataset_dir: Path, nnunet_preprocessed: Path | str | None = None) -> Path:
    """Keep the existing folds' real cases, put all current synthetic cases into every training set.

    Synthetic names are removed from validation sets (and stale ones from training sets). Without a
    splits file this is ``write_splits``. Real cases that are in no fold are reported as a warning.
    """
    dataset_dir = Path(dataset_dir)
    path = splits_path(dataset_dir, nnunet_preprocessed)
    if not path.is_file():
        return write_splits(dataset_dir, nnunet_preprocessed)
    with exclusive_dir_lock(dataset_dir, "writing"):
        real, synthetic = real_and_synthetic(dataset_dir)
        folds = json.loads(path.read_text())
        updated = []
        for fold in folds:
            keep = [c for c in fold["train"] if not c.startswith(SYNTHETIC_PREFIX)]
            updated.append({
                "train": keep + synthetic,
                "val": [c for c in fold["val"] if not c.startswith(SYNTHETIC_PREFIX)],
            })
        in_folds = {c for f in updated for c in f["train"] + f["val"]}
        outside = [c for c in real if c not in in_folds]
        if outside:
            warnings.warn(f"{len(outside)} real case(s) are in no fold of {path} (e.g. {outside[0]}); "
                          "call write_splits to re-split", stacklevel=2)
        if updated == folds:
            return path
        return _save(dataset_dir, path, updated)


def custom_folds(
    dataset_dir: Path,
    folds: Sequence[Mapping[str, Sequence[str]]],
    nnunet_preprocessed: Path | str | None = None,
    allow_synthetic_val: bool = False,
) -> Path:
    """Write arbitrary folds ``[{"train": [...], "val": [...]}, ...]`` (e.g. one fold per data mix).

    Every case must exist in the dataset; validation cases must be real unless
    ``allow_synthetic_val``. Fold ``k`` of nnU-Net then trains on ``folds[k]["train"]``.
    """
    dataset_dir = Path(dataset_dir)
    path = splits_path(dataset_dir, nnunet_preprocessed)
    with exclusive_dir_lock(dataset_dir, "writing"):
        real, synthetic = real_and_synthetic(dataset_dir)
        known, real_set = set(real) | set(synthetic), set(real)
        clean: list[Fold] = []
        for k, fold in enumerate(folds):
            if set(fold) != {"train", "val"}:
                raise ValueError(f"fold {k} must have exactly the keys 'train' and 'val'")
            train, val = [str(c) for c in fold["train"]], [str(c) for c in fold["val"]]
            if not train or not val:
                raise ValueError(f"fold {k} has an empty training or validation set")
            unknown = [c for c in train + val if c not in known]
            if unknown:
                raise ValueError(f"fold {k} names case(s) not in the dataset: {unknown[:5]}")
            for part, cases in (("train", train), ("val", val)):
                if len(set(cases)) != len(cases):
                    raise ValueError(f"fold {k} lists a case twice in {part!r}")
            if not allow_synthetic_val and any(c not in real_set for c in val):
                raise ValueError(f"fold {k} validates on synthetic cases; pass allow_synthetic_val=True if intended")
            clean.append({"train": train, "val": val})
        if not clean:
            raise ValueError("no folds given")
        return _save(dataset_dir, path, clean)
