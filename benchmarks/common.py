"""DSB2018 (BBBC038, CC0) access shared by the benchmarks: labels from its metadata, one split."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from pathar_aug.ingest import Sample, load_pairs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / "work"  # checkpoints and caches (git-ignored), so runs resume
DSB_ROOT = Path(os.environ.get("PATHAR_DSB2018", REPO.parent / "shared" / "data" / "dsb2018"))


def dsb2018_labels_csv(path: Path) -> Path:
    """Write the ``name,label`` CSV pathar-aug reads, from metadata.csv's modality heuristic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (DSB_ROOT / "metadata.csv").open() as f, path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["name", "label"])
        for row in csv.DictReader(f):
            writer.writerow([row["id"], row["modality_heuristic"]])
    return path


def load_dsb2018() -> list[Sample]:
    if not (DSB_ROOT / "images").is_dir():
        raise SystemExit(f"DSB2018 not found at {DSB_ROOT}; set PATHAR_DSB2018 to its folder")
    return load_pairs(DSB_ROOT / "images", DSB_ROOT / "masks", dsb2018_labels_csv(WORK / "dsb2018_labels.csv"))
