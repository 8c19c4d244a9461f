"""What the shipped starting point buys: quality against training minutes, from scratch vs from it.

    python -m benchmarks.finetune_curves [--per-label 12] [--points 100,250] [--n 32] [--arms ...]

A user with a few dozen tiles is played by DSB2018 images the starting point never saw: its
held-out source images (run.json: heldout_sources), split per label into `--per-label` "user"
images to train on and the rest to judge with. Three ways to train on the user images, each
measured at growing prior steps (`train --resume --prior-steps`, so each point continues the one
before, and the minutes add up):

    scratch                         the cpu preset from nothing (tokenizer --scratch-tokenizer-steps)
    dsb2018 + frozen tokenizer      --init dsb2018 --init-tokenizer freeze
    dsb2018 + fine-tuned tokenizer  --init dsb2018 (tokenizer --finetune-tokenizer-steps)

plus the starting point as shipped (0 minutes). Every point is judged as `pathar-aug evaluate`
judges a run, on the judging images (half of them the reference, by source image): KID in the
colour-texture space, image-mask Dice of the independent segmenter, empty-mask share gap, for the
model's pairs and for those its quality filter keeps. Minutes are the wall time of
`pathar-aug train` (every stage: tokenizer, token cache, prior, filter, sampling defaults) on this
machine. Writes benchmarks/results/finetune_curves.csv / .json / .png; work in
benchmarks/work/finetune_curves (resumable: finished points are read back).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import time
from pathlib import Path

import torch

from benchmarks.common import DSB_ROOT, RESULTS, WORK, dsb2018_labels_csv
from pathar_aug import starting_points
from pathar_aug.device import resolve_device
from pathar_aug.evaluation import EvalConfig
from pathar_aug.evaluation.run import evaluate_run
from pathar_aug.pipeline import RUN_FILE, RunInfo, make_settings, train_run
from pathar_aug.sampler import SamplingConfig
from pathar_aug.sampling_defaults import resolve_sampling

OUT = WORK / "finetune_curves"
# (set, feature space, metric) read from each point's metrics.csv
METRICS = [("colour-texture-histograms", "kid"), ("segmenter", "image_mask_dice"), ("masks", "empty_share_gap")]
SETS = ("model", "model, filtered")
ARMS = ("dsb2018 + frozen tokenizer", "scratch", "dsb2018 + fine-tuned tokenizer")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "_", text)


def split_heldout(start: Path, per_label: int, seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]], dict]:
    """The starting point's held-out source images per label: (user, judge) names, and name -> label."""
    renames = starting_points.about(str(start)).get("label_renames", {}) if (start / starting_points.ABOUT_FILE).is_file() else {}
    with dsb2018_labels_csv(WORK / "dsb2018_labels.csv").open() as f:
        label_of = {r["name"]: renames.get(r["label"], r["label"]) for r in csv.DictReader(f)}
    by_label: dict[str, list[str]] = {}
    for name in sorted(RunInfo.load(start).heldout_sources):
        by_label.setdefault(label_of[name], []).append(name)
    user, judge = {}, {}
    for label, names in sorted(by_label.items()):
        random.Random(seed).shuffle(names)
        k = min(per_label, len(names) // 2)  # at least half of them left to judge with
        user[label], judge[label] = sorted(names[:k]), sorted(names[k:])
    return user, judge, label_of


def link_folder(root: Path, names: dict[str, list[str]]) -> tuple[Path, Path, Path]:
    """images/, masks/ (symlinks into DSB2018) and labels.csv for the given names."""
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, label_names in names.items():
        for name in label_names:
            for src, dst in ((DSB_ROOT / "images", images), (DSB_ROOT / "masks", masks)):
                target = next(src.glob(f"{name}.*"))
                link = dst / target.name
                if not link.exists():
                    link.symlink_to(target)
            rows.append((name, label))
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("name", "label"), *rows])
    return images, masks, root / "labels.csv"


def judge(run: Path, data: tuple[Path, Path, Path], out: Path, n: int, device: torch.device) -> list[dict]:
    """The point's figures per label (and their mean), read from its evaluation tables."""
    done = out / "metrics.csv"
    if not done.is_file():
        evaluate_run(model=run, images=data[0], masks=data[1], labels_csv=data[2], out=out, n=n,
                     features=["colour-texture"], references=False,
                     sampling=SamplingConfig(seed=0, **resolve_sampling(run)),
                     config=EvalConfig(progress=False, seed=0), cache_dir=OUT / "eval_cache", device=device,
                     log=lambda msg: None)
    rows = []
    with done.open() as f:
        for r in csv.DictReader(f):
            if r["set"] in SETS and (r["feature_space"], r["metric"]) in METRICS:
                rows.append({"label": r["label"], "set": r["set"], "metric": r["metric"], "value": float(r["value"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start", default="dsb2018", help="starting point: shipped name or run folder")
    ap.add_argument("--per-label", type=int, default=12, help="user images per label")
    ap.add_argument("--points", default="100,250", help="prior steps at which each arm is judged")
    ap.add_argument("--scratch-tokenizer-steps", type=int, default=200)
    ap.add_argument("--finetune-tokenizer-steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=32, help="generated pairs per label and point")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = resolve_device(args.device)
    start = starting_points.resolve(args.start)
    points = [int(p) for p in args.points.split(",")]
    user, judged, _ = split_heldout(start, args.per_label, args.seed)
    user_data = link_folder(OUT / "data" / "user", user)
    judge_data = link_folder(OUT / "data" / "judge", judged)
    t0 = time.time()
    rows: list[dict] = []
    timing_file = OUT / "minutes.json"
    minutes = json.loads(timing_file.read_text()) if timing_file.is_file() else {}

    def record(arm: str, steps: int, point_minutes: float, run: Path) -> None:
        for r in judge(run, judge_data, OUT / "judged" / slug(f"{arm}-{steps}"),
                       args.n, device):
            rows.append({"arm": arm, "prior_steps": steps, "minutes": round(point_minutes, 2), **r})
        print(f"{arm} @ {steps} prior steps, {point_minutes:.1f} min: judged", flush=True)
        write_results(rows, args, user, judged, time.time() - t0)  # after every point: a stopped run keeps its part

    record("dsb2018 as shipped", 0, 0.0, start)
    for arm in [a for a in args.arms.split(",") if a]:
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
        run = OUT / "runs" / slug(arm)
        for steps in points:
            key = f"{arm}@{steps}"
            if key not in minutes:
                t = time.time()
                if not (run / RUN_FILE).is_file():
                    init = None if arm == "scratch" else str(start)
                    tok_steps = {"scratch": args.scratch_tokenizer_steps}.get(arm, args.finetune_tokenizer_steps)
                    settings = make_settings(*user_data, "cpu", {"steps": tok_steps}, {"steps": steps},
                                             val_fraction=0.1, seed=args.seed, init=init,
                                             init_tokenizer="freeze" if "frozen" in arm else "finetune")
                    train_run(run, settings, device)
                else:
                    train_run(run, None, device, resume=True, given={"prior_steps": steps})
                before = max([v for k, v in minutes.items() if k.startswith(f"{arm}@")], default=0.0)
                minutes[key] = before + (time.time() - t) / 60
                timing_file.write_text(json.dumps(minutes, indent=1))
            record(arm, steps, minutes[key], run)
    print(f"wrote {RESULTS / 'finetune_curves.csv'}")


def write_results(rows: list[dict], args: argparse.Namespace, user: dict, judged: dict, wall_s: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "finetune_curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["arm", "prior_steps", "minutes", "label", "set", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    (RESULTS / "finetune_curves.json").write_text(json.dumps({
        "command": "python -m benchmarks.finetune_curves " + " ".join(
            f"--{k.replace('_', '-')} '{v}'" for k, v in vars(args).items() if k != "device"),
        "user_images": user, "judge_images": judged, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch_threads": torch.get_num_threads(), "wall_minutes_this_call": round(wall_s / 60, 1),
    }, indent=1))
    plot(rows, RESULTS / "finetune_curves.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, m) for m in ("kid", "image_mask_dice", "empty_share_gap") for s in SETS]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (set_name, metric) in zip(axes.T.flatten(), panels):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            pts = sorted((r["minutes"], r["value"]) for r in rows
                         if r["arm"] == arm and r["set"] == set_name and r["metric"] == metric and r["label"] == "(mean)")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=arm)
        ax.set_title(f"{metric} ({set_name}; mean over labels)", fontsize=9)
        ax.set_xlabel("training minutes (2 CPU cores)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
