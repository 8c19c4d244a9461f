"""Train the Dual-VQ tokenizer on the DSB2018 training pool and measure it on held-out images.

    python -m benchmarks.tokenizer_recon --preset cpu

The tokenizer is the first stage of the DSB2018 run folder benchmarks/work/dsb2018_<preset>
(split by source image, 20% of each modality held out), which `pathar-aug train --resume` then
completes with the prior; every DSB2018 benchmark shares that run and its held-out images.

Writes benchmarks/results/tokenizer_recon.json (per modality: psnr, mask_dice, usage_structure,
usage_appearance, and the token-resolution baseline), a preview PNG and the token-swap grid
(paper Fig. 6). The checkpoint lives in benchmarks/work/ so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from benchmarks.common import RESULTS, VAL_FRACTION, dsb2018_run
from pathar_aug.config import save_json, to_dict
from pathar_aug.device import resolve_device
from pathar_aug.metrics import reconstruction_report
from pathar_aug.pipeline import load_patches
from pathar_aug.preview import save_grid, to_rgb_tiles
from pathar_aug.tokenizer import TOKENIZER_PRESETS
from pathar_aug.train_tokenizer import load_tokenizer, save_preview, train_tokenizer

MAX_EVAL_PATCHES = 256  # per modality


@torch.no_grad()
def token_swap_grid(model, patches, device, path) -> None:
    """Row p, column q: structure of modality p's patch with appearance of modality q's patch."""
    picks = [int(torch.nonzero(patches.labels == li).flatten()[0]) for li in range(len(patches.label_names))]
    images, masks = patches.images[picks].to(device), patches.masks[picks].to(device)
    s, a = model.encode(images, masks)
    header = [255 * torch.ones_like(images[0]).permute(1, 2, 0).cpu().numpy()] + to_rgb_tiles(images)
    rows = [header]
    for p in range(len(picks)):
        swapped = model.decode_image(s[p:p + 1].expand(len(picks), -1, -1), a)
        rows.append([to_rgb_tiles(masks[p:p + 1])[0], *to_rgb_tiles(swapped)])
    save_grid(rows, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=list(TOKENIZER_PRESETS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="split and training seed")
    args = ap.parse_args()
    device = resolve_device(args.device)
    run, settings, summary = dsb2018_run(args.preset, tokenizer_steps=args.steps, seed=args.seed)
    cfg = settings.tokenizer
    train_patches, val_patches = load_patches(run)
    label_names = train_patches.label_names
    keep = torch.cat([torch.nonzero(val_patches.labels == li).flatten()[:MAX_EVAL_PATCHES]
                      for li in range(len(label_names))])
    val_patches = val_patches.subset(keep)

    t0 = time.time()
    ckpt = train_tokenizer(train_patches, run / "tokenizer", cfg, device, resume=True, seed=args.seed)
    train_seconds = time.time() - t0
    model = load_tokenizer(ckpt, device)
    report = reconstruction_report(model, val_patches, device)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_preview(model, val_patches, RESULTS / "tokenizer_recon_preview.png", device, n=12)
    token_swap_grid(model, val_patches, device, RESULTS / "tokenizer_token_swap.png")
    result = {
        **report,
        "settings": {
            "command": f"python benchmarks/tokenizer_recon.py --preset {args.preset}"
                       + (f" --steps {args.steps}" if args.steps else ""),
            "preset": args.preset, "config": to_dict(cfg), "device": str(device),
            "run": str(run.relative_to(run.parents[2])), "train_images": summary["train_images"],
            "val_images": summary["heldout_images"], "train_patches": len(train_patches),
            "val_patches_per_modality": {n: int((val_patches.labels == i).sum()) for i, n in enumerate(label_names)},
            "split": f"by source image, {VAL_FRACTION:.0%} per modality held out, seed {args.seed}",
            "train_seconds_this_invocation": round(train_seconds, 1),
            "baseline": "area-downsample by r then bilinear upsample (what the token grid alone keeps)",
            "mask_dice": "pooled over all held-out patches of the modality",
            "usage": "share of codebook entries hit by the held-out patches of the modality",
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        },
    }
    save_json(result, RESULTS / "tokenizer_recon.json")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
