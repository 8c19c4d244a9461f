"""What the masks of a Dice study's training sets look like: real tiles, validation tiles, synthetic.

    python -m benchmarks.study_masks --out benchmarks/work/dice_scaling_gpu_partner --name study_masks_gpu_partner

Reads a study folder made by ``benchmarks.dice_scaling`` (its plan.json and nnU-Net raw dataset) and,
per label, for the real training tiles of every seed (picked nuclei first, spread over the source
images), the validation tiles, each kind of synthetic cases (every seed's draw) and the tiles the
generator was trained on (all tiles of its pool images, empty ones too) and those tiles' masks
after the generator's tokenizer (encoded, then decoded from the structure tokens alone): the foreground share, the nuclei per tile (connected components of the
binary mask, 8-connected) and their median area in pixels, and the share of empty masks. A group's
effect on Dice is easier to read beside how far its masks are from the real ones (more, fewer,
larger nuclei; empty masks where the real tiles have none).

Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS
from benchmarks.study_folder import study_dataset, training_sets
from pathar_aug.evaluation.structure_stats import mask_stats


def mask_figures(masks) -> dict:
    """Figures of binary masks (an iterable of H x W arrays), from the evaluation's own morphology."""
    stats = mask_stats(list(masks))
    return {"tiles": len(stats.foreground_fraction),
            "foreground_share": round(float(stats.foreground_fraction.mean()), 4),
            "nuclei_per_tile": round(float(stats.nuclei_per_patch.mean()), 2),
            "median_nucleus_area_px": float(np.median(stats.areas)) if len(stats.areas) else None,
            "empty_share": round(stats.empty_share, 4)}


@torch.no_grad()
def round_trip(tokenizer, patches, rows: torch.Tensor, batch_size: int = 64):
    for begin in range(0, len(rows), batch_size):
        index = rows[begin:begin + batch_size]
        s, _ = tokenizer.encode(patches.images[index], patches.masks[index])
        yield from tokenizer.decode_mask(s)[:, 0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the study's folder (benchmarks.dice_scaling --out)")
    ap.add_argument("--name", required=True, help="report name in benchmarks/results/")
    args = ap.parse_args()
    plan, dataset, ending = study_dataset(args.out)

    def masks(cases):
        return (np.asarray(Image.open(dataset / "labelsTr" / f"{case}{ending}")) for case in sorted(set(cases)))

    settings = json.loads((args.out / "settings.json").read_text())
    pool = tokenizer = None
    if settings.get("model"):  # what the generator was trained on: every tile of its pool images
        from pathar_aug.pipeline import TOKENIZER_CKPT, load_patches
        from pathar_aug.train_tokenizer import load_tokenizer

        pool, _ = load_patches(Path(settings["model"]))
        tokenizer = load_tokenizer(Path(settings["model"]) / TOKENIZER_CKPT, "cpu").float().eval()

    result: dict = {}
    for label in plan["labels"]:
        result[label] = {name: mask_figures(masks(cases)) for name, cases in training_sets(plan, label).items()}
        if pool is not None:
            rows = (pool.labels == pool.label_names.index(label)).nonzero().flatten()
            result[label]["generator's training tiles"] = mask_figures(pool.masks[i, 0].numpy() for i in rows.tolist())
            # the same tiles' masks after the tokenizer's round trip (encoded, decoded from S alone):
            # what the token grid can draw at all, before the prior draws anything
            result[label]["their masks through the tokenizer"] = mask_figures(round_trip(tokenizer, pool, rows))

    lines = [f"# Masks of the Dice study in {args.out.name}", "",
             "Nuclei: 8-connected components of the binary mask (touching nuclei count as one).", "",
             "| Label | Set | Tiles | Foreground share | Nuclei per tile | Median nucleus area (px) | Empty share |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, sets in result.items():
        for name, f in sets.items():
            area = f"{f['median_nucleus_area_px']:.0f}" if f["median_nucleus_area_px"] is not None else "–"
            lines.append(f"| {label} | {name} | {f['tiles']} | {f['foreground_share']:.3f} | {f['nuclei_per_tile']:.1f} "
                         f"| {area} | {f['empty_share']:.2f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": f"python -m benchmarks.study_masks --out {args.out} --name {args.name}", "sets": result},
        indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
