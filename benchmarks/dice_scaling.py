"""Real + synthetic Dice study on DSB2018 (paper Table IV) with real nnU-Net v2 on CPU.

    python -m benchmarks.dice_scaling                    # the study (resumes; finished folds are kept)
    python -m benchmarks.dice_scaling --model none --synthetic 0 --seeds 1 --name dice_scaling_schedule_f16 \
        --out benchmarks/work/schedule_f16               # the learning curve that sized the schedule

Three modalities (the DSB2018 modality heuristic: brightfield_gray, fluorescence, histology_stained)
stand in for the paper's three. The generator is the shared DSB2018 run (``benchmarks/common.py``:
split by source image, 20% of each modality held out, seed 0); the study uses that same split, so
its validation tiles come from held-out images only (checked against run.json).

Protocol: the CPU schedule (40 epochs x 20 iterations, batch 8, 16..512-feature U-Net) reaches
group I's plateau (``pathar_aug.study.settings.cpu_schedule``); 3 seeds; Dice, AJI and PQ against
DSB2018's instance masks; paired bootstrap intervals. At that schedule one fold takes about 13
minutes on 2 cores and making the synthetic cases about 20, so to stay near 150 minutes the study
keeps three groups, per modality: I 30 real; 30 + 200 synthetic; 30 + 200 quality-filtered
synthetic (the product's default). It drops the classical-augmentation row (``--extra-kinds
classical,filtered``: 3 more folds, about 40 minutes), the paper's synthetic-only row and smaller
counts, and the mask-conditioned row (``--synthetic``, ``--synthetic-only``, ``--extra-kinds`` bring
them back; a folder keeps the settings it was made with, so another set of groups needs another
``--out``).

``--reference benchmarks/work/OTHER`` takes group I from a finished study of the same protocol (any
generator, sampling or filter) instead of training it again: a study of one generator row then
trains half the folds, and its comparison with the other study pairs the same group I.

Writes benchmarks/results/dice_scaling{.csv,.md,.png,.json,_curve.csv}; nnU-Net data, models and
caches stay in benchmarks/work/dice_scaling.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.common import DSB_ROOT, RESULTS, VAL_FRACTION, WORK, dsb2018_labels_csv
from pathar_aug.filter_order import DEFAULT_ORDER, DEFAULT_OVERSAMPLE, ORDERS
from pathar_aug.study.settings import FILTER_EMPTY

UNET_FEATURES, UNET_MAX_FEATURES = 16, 512


def settings_for(args, **overrides):
    from pathar_aug.study import BenchmarkSettings

    labels = dsb2018_labels_csv(WORK / "dsb2018_labels.csv")
    kwargs = dict(images=str(DSB_ROOT / "images"), masks=str(DSB_ROOT / "masks"), labels_csv=str(labels),
                  instances=str(DSB_ROOT / "instances"), real=args.real,
                  synthetic_only=args.synthetic_only, extra_kinds=tuple(args.extra_kinds.split(",")),
                  filter_oversample=args.filter_oversample, filter_order=args.filter_order, unfiltered=args.unfiltered,
                  filter_empty=args.filter_empty,
                  synthetic=tuple(int(s) for s in args.synthetic.split(",")), val=args.val,
                  val_fraction=VAL_FRACTION, split_seed=0,  # the shared generator run's split (common.py)
                  seeds=args.seeds, schedule="cpu", epochs=args.epochs, iterations=args.iterations,
                  batch_size=args.batch_size, unet_features=args.unet_features,
                  unet_max_features=args.unet_max_features, model=str(args.model) if args.model else None,
                  sample_batch=args.sample_batch, guidance=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    kwargs.update(overrides)
    return BenchmarkSettings(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=lambda v: None if v == "none" else Path(v), default=WORK / "dsb2018_cpu",
                        help="trained DSB2018 run folder ('none' for a study of real-only groups)")
    parser.add_argument("--out", type=Path, default=WORK / "dice_scaling")
    parser.add_argument("--real", type=int, default=30)
    # half the paper's largest count (400), for time; real only (0) is group I
    parser.add_argument("--synthetic", default="0,200")
    parser.add_argument("--val", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the cpu schedule's")
    parser.add_argument("--iterations", type=int, default=None, help="default: the cpu schedule's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the cpu schedule's")
    parser.add_argument("--filter-oversample", type=float, default=DEFAULT_OVERSAMPLE,
                        help="candidates per kept filtered pair (default: as synthesize draws)")
    parser.add_argument("--unet-features", type=int, default=UNET_FEATURES)
    parser.add_argument("--unet-max-features", type=int, default=UNET_MAX_FEATURES)
    parser.add_argument("--name", default="dice_scaling", help="report name in benchmarks/results/")
    parser.add_argument("--synthetic-only", type=int, default=0, help="synthetic-only group (0: none)")
    parser.add_argument("--extra-kinds", default="filtered",
                        help="rows beside real + synthetic: rendered, classical, filtered")
    parser.add_argument("--filter-order", default=DEFAULT_ORDER, choices=ORDERS,
                        help="which passing pairs the filtered row keeps: in the order drawn (the product's default) or the best first")
    parser.add_argument("--filter-empty", default="run", choices=FILTER_EMPTY,
                        help="whose empty / full mask shares cap the filtered row: the generator's training "
                             "patches (as synthesize does) or the study's own real tiles")
    parser.add_argument("--no-unfiltered", dest="unfiltered", action="store_false",
                        help="leave out the real + unfiltered synthetic rows (group I and the extra rows only)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a finished study folder of the same protocol (another generator, sampling or filter): "
                             "its group I folds are taken instead of trained again")
    parser.add_argument("--sample-batch", type=int, default=64, help="images sampled together by the generator")
    # default (None): the generator run's own sampling defaults, chosen at the end of its training
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pathar_aug.study import run_benchmark

    settings = settings_for(args)
    paths = run_benchmark(settings, args.out, torch.device(args.device), show_progress=not args.quiet,
                          report_dir=args.out / "report", name=args.name, reference=args.reference)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind, path in paths.items():
        shutil.copyfile(path, RESULTS / path.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
