"""What the images of a Dice study's training sets look like, and how each group's predictions err.

    python -m benchmarks.study_images --out benchmarks/work/dice_scaling_gpu_partner_draw \
        --reference benchmarks/work/dice_scaling_gpu_partner --name study_images_gpu_partner_draw

Reads a study folder made by ``benchmarks.dice_scaling`` (its plan.json, nnU-Net raw dataset and
each fold's predictions on the validation tiles). Per label:

- for the real training tiles (every seed), the validation tiles and each kind of synthetic cases
  (every seed's draw): the texture figures of ``pathar_aug.evaluation.texture`` (fine detail,
  background spread, nucleus contrast), and how far the mask covers what the evaluation's segmenter
  (benchmarks/evaluators, trained on held-out DSB2018 tiles) finds in the image: the share of its
  foreground outside the mask (nuclei the mask leaves out, or the segmenter's false positives) and
  the share of the mask it does not find;
- for every group of the study (its seeds pooled): pixel precision and recall of nnU-Net's
  predictions on the validation tiles and predicted / true foreground, which say whether a group
  loses Dice by drawing too much (precision) or missing nuclei (recall).
Folds a study took from another (``--reference`` in the study) keep their predictions there: give
that study as ``--reference``.

Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS
from benchmarks.generation_quality import EVALUATORS
from benchmarks.study_folder import study_dataset, training_sets
from pathar_aug.evaluation.segmenter import Segmenter
from pathar_aug.evaluation.texture import texture_figures


def coverage(segmenter: Segmenter, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    preds = segmenter.predict([image for image, _ in pairs])
    found = sum(int((p > 0).sum()) for p in preds)
    masked = sum(int((m > 0).sum()) for _, m in pairs)
    both = sum(int(((p > 0) & (m > 0)).sum()) for p, (_, m) in zip(preds, pairs))
    return {"segmenter_outside_mask": round(1 - both / found, 4) if found else None,
            "mask_not_found": round(1 - both / masked, 4) if masked else None}


def prediction_errors(folds: list[Path], truth: np.lib.npyio.NpzFile, labels: list[str]) -> dict:
    counts = {label: np.zeros(3) for label in labels}  # true positive, predicted, true pixels
    for fold in folds:
        with np.load(fold / "predictions.npz") as predictions:
            for case in predictions.files:
                label = next(lb for lb in labels if case.startswith(f"r-{lb.replace('_', '-')}-"))
                p, t = predictions[case] > 0, truth[case] > 0
                counts[label] += [(p & t).sum(), p.sum(), t.sum()]
    return {label: {"precision": round(tp / pred, 4), "recall": round(tp / true, 4),
                    "predicted_over_true": round(pred / true, 4)}
            for label, (tp, pred, true) in counts.items() if pred and true}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the study's folder (benchmarks.dice_scaling --out)")
    ap.add_argument("--reference", type=Path, help="the study this one took folds from (its --reference)")
    ap.add_argument("--name", required=True, help="report name in benchmarks/results/")
    args = ap.parse_args()
    plan, dataset, ending = study_dataset(args.out)
    networks = sorted(EVALUATORS.glob("segmenter-*.pt"))
    if len(networks) != 1:
        raise SystemExit(f"expected one evaluation segmenter in {EVALUATORS}, found {len(networks)}")
    segmenter = Segmenter.load(networks[0], "cpu")

    def pairs(cases) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.asarray(Image.open(dataset / "imagesTr" / f"{c}_0000{ending}").convert("RGB")),
                 np.asarray(Image.open(dataset / "labelsTr" / f"{c}{ending}")))
                for c in sorted(set(cases))]

    labels = plan["labels"]
    images: dict = {}
    for label in labels:
        images[label] = {}
        for name, cases in training_sets(plan, label).items():
            loaded = pairs(cases)
            images[label][name] = {**texture_figures(loaded).to_json(), **coverage(segmenter, loaded)}

    folds: dict[str, list[Path]] = {}
    for fold in sorted((args.out / "groups").iterdir()):
        source = fold if (fold / "predictions.npz").is_file() else (
            args.reference / "groups" / fold.name if args.reference else None)
        if source is None or not (source / "predictions.npz").is_file():
            raise SystemExit(f"{fold.name}: no predictions.npz here" + (
                f" nor in {args.reference}" if args.reference else " (give the study it came from as --reference)"))
        group = json.loads((fold / "result.json").read_text())["group"]
        folds.setdefault(f"{group['numeral']}: {group['description']}", []).append(source)
    with np.load(args.out / "val_instances.npz") as truth:
        errors = {group: prediction_errors(paths, truth, labels) for group, paths in folds.items()}

    lines = [f"# Images and prediction errors of the Dice study in {args.out.name}", "",
             "Texture figures in grey levels (pathar_aug/evaluation/texture.py); coverage by the evaluation's "
             "segmenter (benchmarks/evaluators).", "",
             "| Label | Set | Tiles | Fine detail | Background s.d. | Nucleus contrast | Segmenter outside mask "
             "| Mask not found |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, sets in images.items():
        for name, f in sets.items():
            lines.append(f"| {label} | {name} | {f['tiles']} | {f['fine_detail']:.2f} | {f['background_std']:.1f} "
                         f"| {f['contrast']:.1f} | {f['segmenter_outside_mask']:.3f} | {f['mask_not_found']:.3f} |")
    lines += ["", "nnU-Net's predictions on the validation tiles, seeds pooled (pixels):", "",
              "| Group | Label | Precision | Recall | Predicted / true |", "| --- | --- | ---: | ---: | ---: |"]
    for group, per_label in errors.items():
        for label, e in per_label.items():
            lines.append(f"| {group} | {label} | {e['precision']:.3f} | {e['recall']:.3f} "
                         f"| {e['predicted_over_true']:.3f} |")
    text = "\n".join(lines) + "\n"
    command = f"python -m benchmarks.study_images --out {args.out}" + (
        f" --reference {args.reference}" if args.reference else "") + f" --name {args.name}"
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "images": images, "prediction_errors": errors}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
