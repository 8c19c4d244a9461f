"""Start a run from another run's weights (`pathar-aug train --init RUN`).

A few dozen tiles on a CPU budget cannot teach a tokenizer and a prior from scratch what a larger
run has already learned about nuclei. Both stages can therefore start from a finished run of the
same preset: the tokenizer's weights (fine-tuned, frozen as they are, or "auto": frozen when they
already reconstruct the new tiles as well as the starting run's own held-out ones), and the prior's,
its label embedding matched by label name — a label the starting run knows keeps its row, a new
label starts from the mean of the known rows, and the null label (classifier-free guidance) keeps
its own.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from pathar_aug.patches import PatchSet
from pathar_aug.prior import ARCHITECTURE_FIELDS, InterleavedPrior
from pathar_aug.tokenizer import DualVQTokenizer
from pathar_aug.training import load_checkpoint, selected_weights

TOKENIZER_MODES = ("auto", "finetune", "freeze")
# "auto" freezes the starting tokenizer when it reconstructs the new training tiles about as well as
# its own held-out tiles, and fine-tunes it otherwise. The shipped DSB2018 tokenizer's held-out tiles:
# image PSNR 0.1-0.8 dB under the token-grid baseline, mask Dice 0.97-0.99 (starting_point.json). On
# DSB2018 images it never saw, frozen beat fine-tuned (README, "Starting point vs scratch").
FIT_PSNR_MARGIN_DB = 1.5  # largest shortfall of PSNR under the grid baseline that still fits
FIT_MASK_DICE = 0.95
FIT_PATCHES = 64  # per label: enough for a stable PSNR, seconds on a CPU
# the tokenizer fields that shape its weights: a run started from another must share them
TOKENIZER_ARCHITECTURE = ("patch_size", "downsample", "channels", "res_blocks", "code_dim", "structure_codes",
                          "appearance_codes", "num_classes")


class InitError(ValueError):
    """The starting run cannot seed this one (missing, unfinished or another architecture)."""


def _checkpoint(run_dir: str | Path, relative: str) -> dict:
    from pathar_aug.starting_points import resolve

    path = resolve(run_dir) / relative
    if not path.is_file():
        raise InitError(f"--init {run_dir}: {path} is missing; start from a finished run (pathar-aug train)")
    return load_checkpoint(path)


def _check_same(kind: str, run_dir: Path, theirs: dict, ours: dict, fields: Sequence[str]) -> None:
    differ = [f for f in fields if json.dumps(theirs[f]) != json.dumps(ours[f])]  # tuples and lists alike
    if differ:
        raise InitError(f"--init {run_dir}: its {kind} differs in {', '.join(sorted(differ))} "
                        f"({', '.join(f'{f} {theirs[f]} vs {ours[f]}' for f in sorted(differ))}); "
                        "start from a run of the same preset")


def load_tokenizer_weights(model: DualVQTokenizer, run_dir: str | Path) -> None:
    """Copy a finished run's (or a shipped starting point's) tokenizer weights into ``model``
    (same architecture)."""
    from pathar_aug.config import from_dict, to_dict
    from pathar_aug.tokenizer import TokenizerConfig

    state = _checkpoint(run_dir, "tokenizer/tokenizer.pt")
    theirs = to_dict(from_dict(TokenizerConfig, state["config"]))  # fields added since take their defaults
    _check_same("tokenizer", run_dir, theirs, to_dict(model.cfg), TOKENIZER_ARCHITECTURE)
    model.load_state_dict(state["model"])


def unfit_labels(report: dict[str, dict[str, float]]) -> list[str]:
    """Labels of a reconstruction report (``metrics.reconstruction_report``) whose tiles the
    tokenizer reconstructs worse than the fit limits allow: image PSNR more than
    ``FIT_PSNR_MARGIN_DB`` under the token-grid baseline, or mask Dice under ``FIT_MASK_DICE``."""
    return sorted(label for label, r in report.items()
                  if r["psnr"] < r["baseline_psnr"] - FIT_PSNR_MARGIN_DB or r["mask_dice"] < FIT_MASK_DICE)


@torch.no_grad()
def tokenizer_fit(model: DualVQTokenizer, patches: PatchSet, device: torch.device) -> dict:
    """How well a starting run's tokenizer reconstructs a new run's training patches (up to
    ``FIT_PATCHES`` per label, evenly spread): per label PSNR, its grid baseline and mask Dice, the
    labels outside the fit limits and the tokenizer mode "auto" resolves to."""
    from pathar_aug.metrics import reconstruction_report

    chosen: list[int] = []
    for li in range(len(patches.label_names)):
        index = torch.nonzero(patches.labels == li).flatten()
        step = max(1, math.ceil(len(index) / FIT_PATCHES))
        chosen += index[::step].tolist()
    report = reconstruction_report(model, patches.subset(chosen), device)
    unfit = unfit_labels(report)
    return {"mode": "finetune" if unfit else "freeze", "unfit_labels": unfit,
            "limits": {"psnr_under_baseline_db": FIT_PSNR_MARGIN_DB, "mask_dice": FIT_MASK_DICE},
            "labels": {label: {k: round(r[k], 4) for k in ("patches", "psnr", "baseline_psnr", "mask_dice")}
                       for label, r in report.items()}}


def describe_fit(fit: dict) -> str:
    """One line: the fit per label and what it decided."""
    def against_baseline(r: dict) -> str:
        gap = r["baseline_psnr"] - r["psnr"]
        return f"{abs(gap):.1f} dB {'under' if gap >= 0 else 'over'} the grid baseline"

    parts = [f"{label} PSNR {r['psnr']:.1f} dB ({against_baseline(r)}), mask Dice {r['mask_dice']:.3f}"
             for label, r in fit["labels"].items()]
    limits = "at most {psnr_under_baseline_db} dB under, Dice at least {mask_dice}".format(**fit["limits"])
    verdict = (f"within the limits ({limits}): kept frozen" if fit["mode"] == "freeze" else
               f"outside the limits ({limits}) for {', '.join(fit['unfit_labels'])}: fine-tuned")
    return f"starting tokenizer on your tiles: {'; '.join(parts)}; {verdict}"


def load_prior_weights(prior: InterleavedPrior, run_dir: str | Path, label_names: Sequence[str]) -> dict[str, str]:
    """Copy a finished run's prior into ``prior``, the label embedding matched by name; returns
    label -> "kept" or "new"."""
    from pathar_aug.config import to_dict

    state = _checkpoint(run_dir, "prior/prior.pt")
    _check_same("prior", run_dir, state["config"], to_dict(prior.cfg), ARCHITECTURE_FIELDS)
    theirs = selected_weights(state)
    for key, value in (("num_structure_codes", prior.num_structure_codes),
                       ("num_appearance_codes", prior.num_appearance_codes), ("grid", list(prior.grid))):
        if state[key] != value:
            raise InitError(f"--init {run_dir}: its prior has {key} {state[key]}, this run {value}")
    old_names = list(state["label_names"])
    emb = theirs["label_emb.weight"]  # rows: the starting run's labels, then its null label
    rows, origin = [], {}
    for name in label_names:
        if name in old_names:
            rows.append(emb[old_names.index(name)])
            origin[name] = "kept"
        else:
            rows.append(emb[:len(old_names)].mean(dim=0))
            origin[name] = "new"
    rows.append(emb[len(old_names)])  # the null label
    prior.load_state_dict({**theirs, "label_emb.weight": torch.stack(rows)})
    return origin
