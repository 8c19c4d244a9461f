"""Undoing synthetic writes: exactly the manifest's cases go, dataset.json and splits come back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_integration.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    exclusive_dir_lock,
    tmp_path_for,
    unlink_if_present,
)
from nnunet_integration.dataset import entry_files, read_dataset_json, remove_case_files, write_listing
from nnunet_integration.manifest import SYNTHETIC_PREFIX, load_manifest, manifest_path
from nnunet_integration.paths import preprocessed_dir
from nnunet_integration.splits import SPLITS_NAME


@dataclass
class CleanReport:
    removed_cases: list[str] = field(default_factory=list)
    removed_files: int = 0
    dataset_json_restored: bool = False
    splits: str = "untouched"  # restored | updated | untouched | not found
    splits_file: str | None = None

    def summary(self) -> str:
        """One line for people: what was removed and what was restored."""
        if not self.removed_cases and not self.dataset_json_restored:
            return "no synthetic cases to remove (no manifest); nothing changed"
        text = (f"removed {len(self.removed_cases)} synthetic case(s) ({self.removed_files} files), "
                f"dataset.json {'restored' if self.dataset_json_restored else 'unchanged'}")
        if self.splits_file is not None:
            text += f", splits {self.splits} ({self.splits_file})"
        return text


def clean_synthetic(dataset_dir: Path, nnunet_preprocessed: Path | str | None = None) -> CleanReport:
    """Remove every case in the manifest, restore dataset.json byte for byte, restore/update splits.

    Splits: a file that existed before the first synthetic change is restored byte for byte; one
    that did not (created by this tool or by nnU-Net after synthetic cases were added) keeps its
    folds with synthetic cases removed - deleting it would let nnU-Net re-split over preprocessed
    data that still holds the synthetic cases until preprocessing is rerun.
    Real files are never touched. Each step is atomic, so a killed clean is simply rerun.
    """
    dataset_dir = Path(dataset_dir)
    report = CleanReport()
    with exclusive_dir_lock(dataset_dir, "writing"):
        manifest = load_manifest(dataset_dir)
        if manifest is None:
            return report
        names = set(manifest.cases)

        # the splits file: the one given, else the one this tool changed, else $nnUNet_preprocessed's
        if nnunet_preprocessed is None and manifest.splits is not None:
            split_file: Path | None = Path(manifest.splits["file"])
        else:
            folder = preprocessed_dir(dataset_dir, nnunet_preprocessed)
            split_file = (folder / SPLITS_NAME).absolute() if folder is not None else None
        # the saved original belongs to the file it was read from, not to any other splits file
        record = manifest.splits
        if record is not None and (split_file is None or Path(record["file"]) != split_file):
            record = None

        # 1. nnU-Net stops seeing the synthetic cases before any of their files disappears
        dj, _ = read_dataset_json(dataset_dir)
        if "dataset" in dj and names & set(dj["dataset"]):
            dj["dataset"] = {k: v for k, v in dj["dataset"].items() if k not in names}
            write_listing(dataset_dir, dj)
        # 2. their files (and any half-written temporaries)
        for name in sorted(names):
            report.removed_files += remove_case_files(dataset_dir, name, entry_files(name, manifest.cases[name]))
        report.removed_cases = sorted(names)
        # 3. dataset.json exactly as it was (its plain imagesTr scan now finds only real cases)
        atomic_write_bytes(dataset_dir / "dataset.json", manifest.original_dataset_json.encode("utf-8"))
        report.dataset_json_restored = True
        # 4. splits
        if split_file is not None:
            report.splits_file = str(split_file)
            report.splits = _restore_splits(split_file, record, names)
        # 5. the record itself goes last: until here a rerun redoes the steps above
        unlink_if_present(tmp_path_for(dataset_dir / "dataset.json"))
        unlink_if_present(tmp_path_for(manifest_path(dataset_dir)))
        unlink_if_present(manifest_path(dataset_dir))
    return report


def _restore_splits(path: Path, record: dict | None, names: set[str]) -> str:
    if record is not None and record.get("original") is not None:
        atomic_write_bytes(path, record["original"].encode("utf-8"))
        return "restored"
    if not path.is_file():
        return "not found"
    folds = json.loads(path.read_text())
    ours = lambda c: c in names or c.startswith(SYNTHETIC_PREFIX)  # noqa: E731
    stripped = [{k: [c for c in v if not ours(c)] for k, v in fold.items()} for fold in folds]
    if stripped == folds:
        return "untouched"
    atomic_write_json(path, stripped)
    return "updated"
