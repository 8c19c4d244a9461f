"""Ship the DSB2018 `cpu` run as the package's starting point (`pathar-aug train --init dsb2018`).

    python -m benchmarks.ship_starting_point [--replace]

Exports benchmarks/work/dsb2018_cpu (finished: tokenizer, prior, filter, sampling defaults) into
pathar_aug/starting_points/dsb2018: weights in float16 without optimizer states, labels renamed to
plain modality names (brightfield_gray -> brightfield, histology_stained -> histology), and
starting_point.json with the run's training settings, its training minutes and the held-out
figures measured on it (benchmarks/results: tokenizer_recon.json, generation_quality_cpu_agreement.csv; the
prior's own held-out curve). An existing starting point is replaced only with --replace, after the
old and new figures are printed side by side: replace it only when a measured figure improves.
"""
from __future__ import annotations

import argparse
import csv
import json
import time

from benchmarks.common import RESULTS, VAL_FRACTION, WORK
from pathar_aug import starting_points
from pathar_aug.training import load_checkpoint

NAME = "dsb2018"
RENAME = {"brightfield_gray": "brightfield", "histology_stained": "histology"}
MAX_BYTES = 16 * 1024 * 1024
# the shipped run's generation quality (the headline generation_quality.csv judges another run)
QUALITY_FILE = "generation_quality_cpu_agreement.csv"
# the generation-quality figures kept beside the weights: (set, feature space, metric)
QUALITY = [("model", "colour-texture-histograms", "kid"), ("model", "style-classifier", "kid"),
           ("model", "segmenter", "image_mask_dice"), ("model, filtered", "segmenter", "image_mask_dice"),
           ("real held-out vs real training", "segmenter", "image_mask_dice"), ("model", "masks", "empty_share_gap"),
           ("tokenizer swap", "segmenter", "swap_consistency")]


def _quality_figures() -> dict:
    path = RESULTS / QUALITY_FILE
    if not path.is_file():
        return {}
    wanted = {q: f"{q[2]} ({q[0]}, {q[1]})" for q in QUALITY}
    out: dict[str, dict[str, float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            key = (row["set"], row["feature_space"], row["metric"])
            if key in wanted and row["label"] != "(mean)":
                out.setdefault(wanted[key], {})[RENAME.get(row["label"], row["label"])] = round(float(row["value"]), 4)
    return out


def _renamed(figures: dict) -> dict:
    return {RENAME.get(k, k): v for k, v in figures.items()}


def describe(run) -> dict:
    tok = load_checkpoint(run / "tokenizer" / "tokenizer.pt")
    prior = load_checkpoint(run / "prior" / "prior.pt")
    recon = json.loads((RESULTS / "tokenizer_recon.json").read_text())
    with (run / "prior" / "prior_heldout_curve.csv").open() as f:
        last = list(csv.DictReader(f))[-1]  # the held-out NLL at the prior's last step
    return {
        "source": "DSB2018 stage 1 training set, community-fixed (BBBC038; Caicedo et al., Nature Methods 2019), "
                  f"CC0 1.0: {int((1 - VAL_FRACTION) * 100)} % of each modality's source images; the other "
                  f"{int(VAL_FRACTION * 100)} % (run.json: heldout_sources) were never trained on and give the figures",
        "preset": "cpu",
        "trained": {"tokenizer_steps": int(tok["step"]), "tokenizer_minutes": round(tok.get("elapsed_s", 0) / 60, 1),
                    "prior_steps": int(prior["step"]), "prior_minutes": round(prior.get("elapsed_s", 0) / 60, 1),
                    "machine": "2 CPU cores"},
        "heldout": {
            "tokenizer": {label: {k: round(v[k], 4) for k in ("mask_dice", "psnr", "baseline_psnr")}
                          for label, v in _renamed(recon).items() if isinstance(v, dict) and "psnr" in v},
            "prior_nll_nats_per_token": {"structure": round(float(last["heldout_structure_nll"]), 4),
                                         "appearance": round(float(last["heldout_appearance_nll"]), 4),
                                         "at_step": int(last["step"])},
            "generation_quality": _quality_figures(),
        },
        "commands": ["python -m benchmarks.tokenizer_recon --preset cpu",
                     "pathar-aug train --out benchmarks/work/dsb2018_cpu --resume",
                     "python -m benchmarks.generation_quality --n 200 --filter-order agreement "
                     "--run benchmarks/work/dsb2018_cpu --name generation_quality_cpu_agreement",
                     "python -m benchmarks.ship_starting_point"],
        "exported": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replace", action="store_true", help="replace the shipped starting point")
    args = ap.parse_args()
    run = WORK / "dsb2018_cpu"
    dest = starting_points.STARTING_POINTS_DIR / NAME
    description = describe(run)
    if (dest / starting_points.ABOUT_FILE).is_file():
        old = json.loads((dest / starting_points.ABOUT_FILE).read_text())
        print("shipped:", json.dumps(old["heldout"], indent=1))
        print("new:    ", json.dumps(description["heldout"], indent=1))
        if not args.replace:
            raise SystemExit(f"{dest} exists; compare the figures above and pass --replace if the new run is better")
    starting_points.export(run, dest, description, rename_labels=RENAME)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"{dest} holds {size / 2**20:.1f} MB, over the {MAX_BYTES / 2**20:.0f} MB budget")
    print(f"wrote {dest} ({size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
