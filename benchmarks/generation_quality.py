"""Generation quality of the DSB2018 `cpu` run, with the rows that give each number its scale.

    python -m benchmarks.generation_quality [--n 200] [--device auto] [--run RUN --name NAME]

Runs exactly what `pathar-aug evaluate` runs, on the shared DSB2018 run folder
benchmarks/work/dsb2018_cpu (finish it first: `pathar-aug train ... --resume`, or the tokenizer
benchmark followed by the prior stage). The reference is the run's held-out real patches (20% of
each modality's source images, never trained on); in the same tables:

    real held-out vs real training   the floor: N real training patches per label
    tokenizer reconstructions        those N patches encoded and decoded by the run's tokenizer
    tokenizer swap                   structure tokens of one held-out patch, appearance tokens of another (any label):
                                     its image-mask Dice is the swap consistency (does the image follow S?)
    model                            N pairs per label sampled from the run (its own sampling defaults, sampling.json)
    model, filtered                  N of 2 N sampled pairs that pass the run's quality filter (--filter-order:
                                     as drawn by default, or the best first)
    weak: marginal tokens            N pairs per label of independent tokens from the training token frequencies

N = 200 per label by default, sized so the whole run (DSB2018 ingest, 600 sampled pairs, evaluator
training, features) takes about 10-15 minutes on 2 CPU cores. Feature spaces: the Style-Score
classifier trained on the held-out real patches, and the weight-free colour/texture histograms (no
pretrained backbone can be installed here with its weights; none is downloaded).

Writes benchmarks/results/generation_quality.csv (long table), generation_quality.md (one table per
feature space plus the floor / model / weak scale check), generation_quality_scale_check.csv and
generation_quality_grid_<label>.png. Generated sets, features and evaluator networks are cached in
benchmarks/work/generation_quality/cache, so a re-run only recomputes what changed. The evaluator
networks behind the committed figures (style classifier and segmenter, trained on the held-out
patches of the DSB2018 split) are in benchmarks/evaluators/ and seed that cache (their names are
content hashes of the data and settings they were trained on, so they are used only for the same
ones): every session and machine judges with the same networks, and KIDs compare across runs.

``--run RUN --name NAME`` judges another run folder of DSB2018 with the same split (the GPU-trained
runs of ``benchmarks.gpu_generator``) by the same evaluator networks (the cache is shared), into
benchmarks/results/NAME.csv, NAME.md, NAME_scale_check.csv and NAME_grid_<label>.png.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import DSB_ROOT, RESULTS, WORK, dsb2018_labels_csv, dsb2018_run
from pathar_aug.device import resolve_device
from pathar_aug.evaluation import EvalConfig
from pathar_aug.evaluation.report import grid_name
from pathar_aug.evaluation.run import evaluate_run
from pathar_aug.pipeline import RunInfo
from pathar_aug.filter_order import DEFAULT_ORDER, ORDERS
from pathar_aug.sampler import SamplingConfig
from pathar_aug.sampling_defaults import resolve_sampling


EVALUATORS = Path(__file__).parent / "evaluators"
CACHE = WORK / "generation_quality" / "cache"


def seed_evaluator_cache() -> None:
    """Put the committed evaluator networks into the cache (kept when already there)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    for network in EVALUATORS.glob("*.pt"):
        if not (CACHE / network.name).exists():
            shutil.copyfile(network, CACHE / network.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="generated pairs (and floor patches) per label")
    ap.add_argument("--n-real", type=int, default=2000, help="at most this many held-out patches per label")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--features", action="append", default=None,
                    help="extra feature spaces, as `pathar-aug evaluate --features` (e.g. dinov2:PATH)")
    ap.add_argument("--batch-size", type=int, default=32)
    # default (None): the run's own sampling defaults, chosen at the end of its training
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--filter-order", default=DEFAULT_ORDER, choices=ORDERS,
                    help="which passing pairs the 'model, filtered' set keeps: in the order drawn (the product's default) or the best first")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--run", type=Path, default=None,
                    help="another finished DSB2018 run folder (default: the shared `cpu` run, trained on first use)")
    ap.add_argument("--name", default="generation_quality", help="stem of the result files")
    args = ap.parse_args()

    device = resolve_device(args.device)
    start = time.time()
    if args.run is None:
        run, _, summary = dsb2018_run("cpu")
    else:
        run, summary = args.run, RunInfo.load(args.run).data
    labels_csv = dsb2018_labels_csv(WORK / "dsb2018_labels.csv")
    out = WORK / args.name
    seed_evaluator_cache()
    features = ["style", "colour-texture", *(args.features or [])]
    result = evaluate_run(
        model=run, images=DSB_ROOT / "images", masks=DSB_ROOT / "masks", labels_csv=labels_csv, out=out,
        n=args.n, n_real=args.n_real, features=features,
        sampling=SamplingConfig(batch_size=args.batch_size, seed=args.seed, **resolve_sampling(
            run, guidance=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)),
        config=EvalConfig(progress=not args.quiet, seed=args.seed, filter_order=args.filter_order), device=device,
        log=lambda msg: print(msg, flush=True), cache_dir=CACHE,
    )
    wall = time.time() - start

    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "metrics.csv", RESULTS / f"{args.name}.csv")
    shutil.copyfile(out / "scale_check.csv", RESULTS / f"{args.name}_scale_check.csv")
    for label in result.metadata["labels"]:
        shutil.copyfile(out / f"grid_{grid_name(label)}.png", RESULTS / f"{args.name}_grid_{grid_name(label)}.png")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    run_note = "\n".join([
        "", "## Run", "",
        f"`python -m benchmarks.generation_quality --n {args.n}"
        + (f" --run {args.run} --name {args.name}" if args.run is not None else "") + f"` on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}; "
        f"wall time {wall / 60:.1f} min"
        + (f", load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else "") + ".",
        f"Run folder: {run if args.run is not None else 'benchmarks/work/dsb2018_cpu'} ({summary['train_images']} training and "
        f"{summary['heldout_images']} held-out source images of DSB2018, labels from metadata.csv's modality heuristic).",
        f"N = {args.n} generated pairs per label (and as many real training patches in the floor row); "
        "the `real` reference holds the held-out patches stated above (at most "
        f"{args.n_real} per label). Grids: {args.name}_grid_<label>.png.", "",
    ])
    (RESULTS / f"{args.name}.md").write_text((out / "metrics.md").read_text() + run_note)
    print(result.scale.to_string(index=False))
    print(f"\nwrote {RESULTS / (args.name + '.md')} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
