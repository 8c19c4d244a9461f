"""Shared training machinery for both stages: the paper's AdamW, checkpoints, loss CSV."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

import torch

from nnunet_integration.atomic import atomic_write_bytes


def make_adamw(
    model: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices / conv kernels only.

    Norm scales, biases, embeddings and codebooks (all < 2-D, or registered as embeddings) are not
    decayed: decaying them shrinks codes and label embeddings towards zero for no benefit.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """torch.save, written atomically: an interrupted save never corrupts a checkpoint."""
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path), map_location=map_location, weights_only=False)


def selected_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a finished checkpoint is used with: those of its lowest held-out point when
    training kept one (``state["best"]``), else the last step's (``state["model"]``, also the
    resume point)."""
    return state["best"]["model"] if state.get("best") else state["model"]


class LossCSV:
    """Appends one row per logged step; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: str | Path, columns: Iterable[str], resume_step: int = 0):
        self.path = Path(path)
        self.columns = ["step", *columns]
        rows: list[dict[str, str]] = []
        if resume_step > 0 and self.path.exists():
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {"step": step, **{k: f"{float(v):.6g}" for k, v in values.items()}}
            )


def label_balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Sampling weights that show every label equally often, however many patches each has."""
    counts = torch.bincount(labels).float()
    return 1.0 / counts[labels]
