"""Does partner appearance make nuclei follow S at the CPU scale too? Tokenizers alone, side by side.

    python -m benchmarks.tokenizer_swap [--partner 0.5] [--steps 1200] [--n 200]

Trains a `cpu`-preset tokenizer with ``TokenizerConfig.appearance_partner = --partner`` on the
DSB2018 split of benchmarks/work/dsb2018_gpu (seed 0, 20 % of each modality's source images held
out; run ``benchmarks.gpu_generator unpack`` first) on this machine, at the preset's own scale
(1,200 steps of 16; resumable: the same command goes on), then judges it, and every other partner
share trained here before (``--partner 0.2`` after ``--partner 0.5``: both in one table), beside the shipped
starting point's tokenizer (the same preset and scale, without partner) and the GPU-trained ones:
per modality, on ``--n`` held-out tiles, reconstruction PSNR and the swap consistency of
``generation_quality`` — structure of a held-out tile, appearance of another of any label, the
image segmented by the evaluation's own segmenter (the one ``generation_quality`` uses, from
benchmarks/evaluators/) against the mask decoded from the structure — split into structures with nuclei and empty
structures (the share of images left clean). Every tokenizer sees the same tiles and the same
swaps. Writes benchmarks/results/tokenizer_swap.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, WORK
from benchmarks.generation_quality import EVALUATORS
from pathar_aug import starting_points
from pathar_aug.evaluation.report import dice_apart
from pathar_aug.evaluation.segmenter import Segmenter
from pathar_aug.evaluation.sets import swap_pairs, swap_partners
from pathar_aug.metrics import reconstruction_report
from pathar_aug.patches import PatchSet
from pathar_aug.pipeline import TOKENIZER_CKPT, load_patches
from pathar_aug.tokenizer import TOKENIZER_PRESETS
from pathar_aug.train_tokenizer import load_tokenizer, train_tokenizer

SPLIT_RUN = WORK / "dsb2018_gpu"


def held_out_tiles(patches: PatchSet, n: int, seed: int = 0) -> PatchSet:
    """Up to n held-out tiles per label, the same for every tokenizer."""
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.permutation(torch.nonzero(patches.labels == li).flatten().numpy())[:n])
              for li in range(len(patches.label_names))]
    return patches.subset(torch.from_numpy(np.concatenate(chosen)))


def as_pairs(patches: PatchSet) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per label, (H x W x 3 image, H x W mask) pairs, as the evaluation holds them."""
    return {label: [(patches.images[i].permute(1, 2, 0).numpy(), patches.masks[i, 0].numpy())
                    for i in torch.nonzero(patches.labels == li).flatten().tolist()]
            for li, label in enumerate(patches.label_names)}


def judge(tokenizer, tiles: PatchSet, swaps: dict, segmenter: Segmenter, device: torch.device) -> dict:
    recon = reconstruction_report(tokenizer, tiles, device)
    out = {}
    for label in sorted(swaps):
        s_images, s_masks = swap_pairs(tokenizer, [s for s, _ in swaps[label]], [a for _, a in swaps[label]], device)
        pairs = list(zip(s_images.permute(0, 2, 3, 1).numpy(), s_masks[:, 0].numpy()))
        dice = segmenter.dice_against(pairs)
        apart = dice_apart(dice, pairs)
        out[label] = {
            "reconstruction_psnr": recon[label]["psnr"],  # over all pixels of the label's tiles
            "swap_consistency": float(dice.mean()),
            "swap_dice_with_nuclei": apart.get("on_masks_with_nuclei", (None, 0))[0],
            "swap_clean_on_empty": apart.get("on_empty_masks", (None, 0))[0],
            "swaps": len(pairs), "empty_structures": apart.get("on_empty_masks", (None, 0))[1],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partner", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=None, help="tokenizer steps (default: the cpu preset's)")
    ap.add_argument("--n", type=int, default=200, help="held-out tiles and swaps per modality")
    args = ap.parse_args()
    device = torch.device("cpu")
    train, heldout = load_patches(SPLIT_RUN)
    cfg = dataclasses.replace(TOKENIZER_PRESETS["cpu"], appearance_partner=args.partner,
                              **({"steps": args.steps} if args.steps else {}))
    out_dir = WORK / f"tokenizer_cpu_partner{args.partner:g}"
    start = time.time()
    ckpt = train_tokenizer(train, out_dir, cfg, device, resume=True, seed=0)
    trained_min = float(torch.load(ckpt, map_location="cpu", weights_only=False).get("elapsed_s", 0.0)) / 60

    segmenters = sorted(EVALUATORS.glob("segmenter-*.pt"))
    if len(segmenters) != 1:
        raise SystemExit(f"expected the evaluation's one segmenter in {EVALUATORS}, found {len(segmenters)}")
    segmenter = Segmenter.load(segmenters[0], "cpu")
    tiles = held_out_tiles(heldout, args.n)
    reference = as_pairs(tiles)
    swaps = swap_partners(reference, args.n, seed=0)
    tokenizers = {"shipped (cpu preset, no partner, 1,200 x 16)": starting_points.resolve("dsb2018") / TOKENIZER_CKPT}
    # every partner share trained here so far (this call's and earlier calls'), smallest first: one table
    for trained in sorted(WORK.glob("tokenizer_cpu_partner*/" + ckpt.name),
                          key=lambda p: float(p.parent.name.removeprefix("tokenizer_cpu_partner"))):
        saved = torch.load(trained, map_location="cpu", weights_only=False)["config"]
        tokenizers[f"cpu preset + partner {saved['appearance_partner']:g} ({saved['steps']} x {saved['batch_size']}, "
                   "this machine)"] = trained
    tokenizers |= {
        "GPU (2,800 x 64, no partner)": WORK / "dsb2018_gpu" / TOKENIZER_CKPT,
        "GPU + partner 0.5 (2,800 x 64)": WORK / "dsb2018_gpu_partner" / TOKENIZER_CKPT,
    }
    result = {"command": f"python -m benchmarks.tokenizer_swap --partner {args.partner:g}"
                         + (f" --steps {args.steps}" if args.steps else "") + f" --n {args.n}",
              "partner_training_minutes": round(trained_min, 1), "segmenter": segmenters[0].name,
              "real_tiles_segmenter_dice": {lb: float(segmenter.dice_against(reference[lb]).mean()) for lb in reference},
              "tokenizers": {}}
    for name, path in tokenizers.items():
        if not Path(path).is_file():
            print(f"skipped {name}: no {path}")
            continue
        tokenizer = load_tokenizer(path, device).float().eval()
        figures = judge(tokenizer, tiles, swaps, segmenter, device)
        result["tokenizers"][name] = figures
        print(name, json.dumps({lb: round(v["swap_consistency"], 3) for lb, v in figures.items()}), flush=True)
    result["wall_minutes"] = round((time.time() - start) / 60, 1)
    (RESULTS / "tokenizer_swap.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS / 'tokenizer_swap.json'}")


if __name__ == "__main__":
    main()
