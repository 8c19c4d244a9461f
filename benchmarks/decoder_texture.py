"""How real the tokenizer's image decoder paints: texture figures of held-out reconstructions.

    python -m benchmarks.decoder_texture --runs benchmarks/work/dsb2018_gpu_partner \
        benchmarks/work/dsb2018_gpu_partner_adv --name decoder_texture_gpu_partner_adv

For each run folder (same data and split), per label: the held-out tiles encoded and decoded again
by the run's tokenizer (the image from both token grids, the mask from S), with the texture figures
of ``pathar_aug.evaluation.texture`` (fine detail, background spread, nucleus contrast, against the
real tiles' own mask) and PSNR, beside the real tiles' figures. A decoder that paints too smooth
shows low fine detail and background spread and a high contrast; its prior is not involved, so the
figures say what any sample of the run can look like at best. The first ``--tiles`` held-out tiles
of each label are used.

Writes benchmarks/results/NAME.json, NAME.md and NAME.png (per label: real tiles, then each run's
reconstructions).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS
from pathar_aug.evaluation.texture import texture_figures
from pathar_aug.metrics import psnr
from pathar_aug.pipeline import TOKENIZER_CKPT, load_patches
from pathar_aug.train_tokenizer import load_tokenizer


def pairs_of(images: torch.Tensor, masks: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(im.permute(1, 2, 0).numpy(), m[0].numpy()) for im, m in zip(images, masks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders trained on the same data and split")
    ap.add_argument("--name", required=True, help="report name in benchmarks/results/")
    ap.add_argument("--tiles", type=int, default=48, help="held-out tiles per label")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, heldout = load_patches(args.runs[0])
    if heldout is None:
        raise SystemExit(f"{args.runs[0]} holds no held-out tiles")
    tokenizers = {}
    for run in args.runs:
        state = torch.load(run / TOKENIZER_CKPT, map_location="cpu", weights_only=False)
        tokenizers[str(run)] = (load_tokenizer(run / TOKENIZER_CKPT), int(state["step"]))
    result: dict = {"command": "python -m benchmarks.decoder_texture --runs " + " ".join(map(str, args.runs))
                    + f" --name {args.name}" + (f" --tiles {args.tiles}" if args.tiles != 48 else ""),
                    "labels": {}}
    strips = []
    for index, label in enumerate(heldout.label_names):
        rows = (heldout.labels == index).nonzero().flatten()[:args.tiles]
        images, masks = heldout.images[rows], heldout.masks[rows]
        entry = {"real": texture_figures(pairs_of(images, masks)).to_json()}
        strip = [torch.cat(list(images[:6]), 2)]
        for run, (tokenizer, step) in tokenizers.items():
            with torch.no_grad():
                s, a = tokenizer.encode(images, masks)
                recon = tokenizer.decode_image(s, a)
            # judged against the real masks: the reconstruction should show the real tile's nuclei
            entry[run] = {**texture_figures(pairs_of(recon, masks)).to_json(), "tokenizer_step": step,
                          "psnr_db": round(float(psnr(recon, images)), 2)}
            strip.append(torch.cat(list(recon[:6]), 2))
        result["labels"][label] = entry
        strips.append(torch.cat(strip, 1))
    Image.fromarray(torch.cat(strips, 1).permute(1, 2, 0).numpy()).save(RESULTS / f"{args.name}.png")

    lines = [f"# Texture of held-out reconstructions ({args.tiles} tiles per label)", "",
             "Grey levels (pathar_aug/evaluation/texture.py); nucleus contrast in background standard deviations.",
             "", "| Label | Tiles | Fine detail | Background s.d. | Nucleus contrast | PSNR (dB) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for label, entry in result["labels"].items():
        for name, f in entry.items():
            shown = "real" if name == "real" else f"{Path(name).name} (step {f['tokenizer_step']})"
            lines.append(f"| {label} | {shown} | {f['fine_detail']:.2f} | {f['background_std']:.1f} "
                         f"| {f['contrast']:.1f} | {f.get('psnr_db', '–')} |")
    lines += ["", f"{args.name}.png: per label, the real tiles, then each run's reconstructions in the order above."]
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
