"""Samples and held-out NLL of the prior trained on DSB2018 (the shared run folder).

    python -m benchmarks.prior_samples --preset cpu

Needs the finished run benchmarks/work/dsb2018_<preset> (tokenizer_recon, then
`pathar-aug train --resume` on it). Writes benchmarks/results/prior_samples_<setting>_<label>.png
(each column: generated image over its generated mask; setting = the paper's truncated sampling or
plain ancestral sampling), the share of empty generated masks per setting, and
prior_heldout_nll.json: per-token NLL of
each stream on the held-out images' tokens, beside the NLL of a per-label unigram model (token
frequencies of the training cache), the simplest model a prior has to beat.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import RESULTS, WORK
from pathar_aug.config import save_json
from pathar_aug.device import resolve_device
from pathar_aug.generator import load_generator
from pathar_aug.preview import save_grid, to_rgb_tiles
from pathar_aug.sampler import SamplingConfig
from pathar_aug.train_prior import evaluate_nll, load_token_cache


def unigram_nll(train: dict, heldout: dict, stream: str, num_codes: int) -> float:
    """Mean NLL (nats) of held-out tokens under per-label token frequencies of the training cache."""
    total, count = 0.0, 0
    for li in range(len(train["label_names"])):
        counts = torch.bincount(train[stream][train["labels"] == li].flatten(), minlength=num_codes).double() + 0.5
        logp = (counts / counts.sum()).log()
        held = heldout[stream][heldout["labels"] == li].flatten()
        total += -logp[held].sum().item()
        count += held.numel()
    return total / max(count, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--per-label", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    run = WORK / f"dsb2018_{args.preset}"
    generator = load_generator(run, device)
    train = load_token_cache(run / "tokens" / "train_tokens.pt")
    heldout = load_token_cache(run / "tokens" / "heldout_tokens.pt")
    nll = evaluate_nll(generator.prior, heldout, device, batch_size=32)
    result = {
        "heldout_nll_nats_per_token": nll,
        "unigram_baseline_nll": {
            "structure": unigram_nll(train, heldout, "structure", train["num_structure_codes"]),
            "appearance": unigram_nll(train, heldout, "appearance", train["num_appearance_codes"]),
        },
        "heldout_sequences": int(heldout["labels"].numel()),
        "settings": {"command": f"python -m benchmarks.prior_samples --preset {args.preset}",
                     "run": f"benchmarks/work/dsb2018_{args.preset}", "device": str(device)},
    }
    # Two settings: the paper's truncated sampling and plain ancestral sampling (both guidance 1.5).
    # The share of empty masks tells whether truncation collapses an under-trained prior.
    settings = {"paper": SamplingConfig(), "plain": SamplingConfig(temperature=1.0, top_k=0, top_p=1.0)}
    t0 = time.time()
    result["empty_mask_share"] = {}
    for name, sampling in settings.items():
        result["empty_mask_share"][name] = {}
        for li, label in enumerate(generator.label_names):
            sampling.seed = li
            images, masks = generator.generate([li] * args.per_label, sampling, device)
            result["empty_mask_share"][name][label] = float((masks.flatten(1).sum(1) == 0).float().mean())
            save_grid([to_rgb_tiles(images[:8]), to_rgb_tiles(masks[:8])], RESULTS / f"prior_samples_{name}_{label}.png")
    result["settings"]["sampling"] = {k: vars(v) for k, v in settings.items()}
    result["settings"]["samples_per_label"] = args.per_label
    result["settings"]["sampling_seconds"] = round(time.time() - t0, 1)
    save_json(result, RESULTS / "prior_heldout_nll.json")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
