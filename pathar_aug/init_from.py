"""Start a run from another run's weights (`pathar-aug train --init RUN`).

A few dozen tiles on a CPU budget cannot teach a tokenizer and a prior from scratch what a larger
run has already learned about nuclei. Both stages can therefore start from a finished run of the
same preset: the tokenizer's weights (then fine-tuned, or frozen as they are), and the prior's, its
label embedding matched by label name — a label the starting run knows keeps its row, a new label
starts from the mean of the known rows, and the null label (classifier-free guidance) keeps its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from pathar_aug.prior import ARCHITECTURE_FIELDS, InterleavedPrior
from pathar_aug.tokenizer import DualVQTokenizer
from pathar_aug.training import load_checkpoint

TOKENIZER_MODES = ("finetune", "freeze")
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


def load_prior_weights(prior: InterleavedPrior, run_dir: str | Path, label_names: Sequence[str]) -> dict[str, str]:
    """Copy a finished run's prior into ``prior``, the label embedding matched by name; returns
    label -> "kept" or "new"."""
    from pathar_aug.config import to_dict

    state = _checkpoint(run_dir, "prior/prior.pt")
    _check_same("prior", run_dir, state["config"], to_dict(prior.cfg), ARCHITECTURE_FIELDS)
    theirs = state["model"]
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
