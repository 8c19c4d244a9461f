"""Real + synthetic Dice scaling on DSB2018 (paper Table IV) with real nnU-Net v2 on CPU.

    python -m benchmarks.dice_scaling [--model benchmarks/work/dsb2018_cpu] [--epochs E --iterations I]
    python -m benchmarks.dice_scaling --calibrate        # nnU-Net s/iteration of the CPU plans at 128 px

Three modalities (the DSB2018 modality heuristic: brightfield_gray, fluorescence, histology_stained)
stand in for the paper's three. The generator is the shared DSB2018 run (``benchmarks/common.py``:
split by source image, 20% of each modality held out, seed 0); the benchmark uses that same split,
so its validation tiles come from held-out images only (checked against run.json). Groups, per
modality, at half the paper's synthetic counts to fit a CPU session: I 30 real; II 50 synthetic;
III-V 30 + 50 / 100 / 200 synthetic; plus 30 + 200 mask-conditioned and 30 + 200 classical
augmentation. One nnU-Net (CPU plans, 128 px patch = tile)
per group over all three modalities, the same short schedule for all; Dice per modality on 50
validation tiles each.

Writes benchmarks/results/dice_scaling.{csv,md,png,json}; nnU-Net data, models and caches stay in
benchmarks/work/dice_scaling (rerun to resume: finished groups are not retrained).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.common import DSB_ROOT, RESULTS, VAL_FRACTION, WORK, dsb2018_labels_csv

# Sized on this 2-core machine (--calibrate; the JSON records the timings of the run): CPU plans at
# 128 px, batch 12, measured 2.6 s/iteration on busy cores (~1 s/iteration on free ones); batch 8 is
# used. 7 groups x 10 x 10 iterations, plus sampling 2 x 600 tiles, preprocessing ~2,000 cases and
# predicting 150 validation tiles per group, is about 25 minutes of 2-core CPU.
EPOCHS, ITERATIONS, BATCH = 10, 10, 8
UNET_FEATURES, UNET_MAX_FEATURES = 16, 512


def settings_for(args, **overrides):
    from pathar_aug.study import BenchmarkSettings

    labels = dsb2018_labels_csv(WORK / "dsb2018_labels.csv")
    kwargs = dict(images=str(DSB_ROOT / "images"), masks=str(DSB_ROOT / "masks"), labels_csv=str(labels),
                  instances=str(DSB_ROOT / "instances"), real=args.real, filtered_row=not args.no_filtered_row,
                  synthetic=tuple(int(s) for s in args.synthetic.split(",")), val=args.val,
                  val_fraction=VAL_FRACTION, split_seed=0,  # the shared generator run's split (common.py)
                  seeds=args.seeds, schedule="cpu", epochs=args.epochs, iterations=args.iterations,
                  batch_size=args.batch_size, unet_features=args.unet_features,
                  unet_max_features=args.unet_max_features, model=str(args.model) if args.model else None,
                  sample_batch=args.sample_batch, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    kwargs.update(overrides)
    return BenchmarkSettings(**kwargs)


def calibrate(args) -> None:
    """Time nnU-Net iterations of the CPU plans on 128 px DSB tiles at a few batch sizes (group I only)."""
    import torch

    from pathar_aug.study import run_benchmark

    out = {}
    for batch in args.calibrate_batches:
        folder = WORK / "dice_scaling_calibration" / f"batch{batch}"
        settings = settings_for(args, synthetic=(0,), extra_rows="none", val=5, epochs=2, iterations=10,
                                batch_size=batch)
        t = time.time()
        paths = run_benchmark(settings, folder, torch.device(args.device), show_progress=False,
                              report_dir=folder / "report")
        data = json.loads(paths["json"].read_text())
        fold = next(iter(data["folds"].values()))
        out[batch] = {"s_per_iteration": fold["s_per_iteration"], "epoch_s_mean": fold["epoch_s_mean"],
                      "train_s": fold["train_s"], "wall_s": round(time.time() - t, 1)}
        print(f"batch {batch}: {out[batch]}", flush=True)
    print(json.dumps(out, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=lambda v: None if v == "none" else Path(v), default=WORK / "dsb2018_cpu",
                        help="trained DSB2018 run folder ('none' for a study of real-only groups)")
    parser.add_argument("--out", type=Path, default=WORK / "dice_scaling")
    parser.add_argument("--real", type=int, default=30)
    # half the paper's counts (100 / 200 / 400) so that sampling and 7 nnU-Net runs fit ~25 CPU minutes
    parser.add_argument("--synthetic", default="0,50,100,200")
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--unet-features", type=int, default=UNET_FEATURES)
    parser.add_argument("--unet-max-features", type=int, default=UNET_MAX_FEATURES)
    parser.add_argument("--name", default="dice_scaling", help="report name in benchmarks/results/")
    parser.add_argument("--no-filtered-row", action="store_true", help="leave out the quality-filtered row")
    parser.add_argument("--sample-batch", type=int, default=64, help="images sampled together by the generator")
    # Plain ancestral sampling (with guidance 1.5): at the paper's truncation (temperature 0.85,
    # top-k 100, top-p 0.92) the short-trained CPU prior collapses to empty masks (see README).
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--calibrate", action="store_true", help="only time nnU-Net iterations at 128 px")
    parser.add_argument("--calibrate-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calibrate:
        calibrate(args)
        return

    from pathar_aug.study import run_benchmark

    settings = settings_for(args)
    paths = run_benchmark(settings, args.out, torch.device(args.device), show_progress=not args.quiet,
                          report_dir=args.out / "report", name=args.name)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind, path in paths.items():
        shutil.copyfile(path, RESULTS / path.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
