"""What the study reports read from a Dice study's folder (``benchmarks.dice_scaling --out``)."""
from __future__ import annotations

import json
from pathlib import Path


def study_dataset(out: Path) -> tuple[dict, Path, str]:
    """The study's plan.json, its one nnU-Net raw dataset folder and that dataset's file ending."""
    plan = json.loads((out / "plan.json").read_text())
    datasets = sorted((out / "nnUNet_raw").glob("Dataset*"))
    if len(datasets) != 1:
        raise SystemExit(f"expected one nnU-Net dataset in {out / 'nnUNet_raw'}, found {len(datasets)}")
    return plan, datasets[0], json.loads((datasets[0] / "dataset.json").read_text())["file_ending"]


def training_sets(plan: dict, label: str) -> dict[str, list[str]]:
    """One label's cases per set: the real training tiles of every seed, the validation tiles and
    each kind of synthetic cases (every seed's draw)."""
    sets = {"real training tiles": [c for seed in plan["real_train"] for c in seed[label]],
            "validation tiles": plan["val"][label]}
    for kind, seeds in plan["synthetic"].items():
        sets[f"synthetic ({kind})"] = [c for seed in seeds for c in seed[label]]
    return sets
