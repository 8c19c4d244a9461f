"""DSB2018 (BBBC038, CC0) access shared by the benchmarks: labels from its metadata, one split."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from pathar_aug.pipeline import RunSettings, make_settings, prepare_run

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "benchmarks" / "work"  # checkpoints and caches (git-ignored), so runs resume
VAL_FRACTION = 0.2  # of each modality's source images, held out from every generator stage
DSB_ROOT = Path(os.environ.get("PATHAR_DSB2018", REPO.parent / "shared" / "data" / "dsb2018"))


def dsb2018_labels_csv(path: Path, root: Path = DSB_ROOT) -> Path:
    """Write the ``name,label`` CSV pathar-aug reads, from metadata.csv's modality heuristic, for
    the images ``root/images`` holds (all of them, except in a subset made for a quick check)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (root / "metadata.csv").open() as f, path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["name", "label"])
        for row in csv.DictReader(f):
            if (root / "images" / f"{row['id']}.png").is_file():
                writer.writerow([row["id"], row["modality_heuristic"]])
    return path


def dsb2018_run(preset: str, tokenizer_steps: int | None = None, prior_steps: int | None = None,
                seed: int = 0) -> tuple[Path, RunSettings, dict]:
    """The shared DSB2018 run folder (created on first use): settings and data summary."""
    import json

    if not (DSB_ROOT / "images").is_dir():
        raise SystemExit(f"DSB2018 not found at {DSB_ROOT}; set PATHAR_DSB2018 to its folder")
    run = WORK / f"dsb2018_{preset}"
    labels = dsb2018_labels_csv(WORK / "dsb2018_labels.csv")
    settings = make_settings(DSB_ROOT / "images", DSB_ROOT / "masks", labels, preset,
                             {"steps": tokenizer_steps}, {"steps": prior_steps}, VAL_FRACTION, seed)
    settings = prepare_run(run, settings, resume=True)
    return run, settings, json.loads((run / "run.json").read_text())["data"]
