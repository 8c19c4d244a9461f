"""A deliberately weak generator that gives the metrics their scale: independent marginal tokens.

``MarginalTokenGenerator`` draws every structure token and every appearance token of a grid
independently from that label's token frequencies in the run's training token cache
(``runs/NAME/tokens/train_tokens.pt``) and decodes them with the run's tokenizer. It knows each
label's token vocabulary and colours but nothing about which tokens go next to which, so its
images have the right palette and no coherent nuclei. A trained prior that does not clearly beat
it on a metric has learned nothing that metric can see.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch


@dataclass
class MarginalTokenGenerator:
    """Per-label unigram token frequencies; positions are drawn independently of each other."""

    structure_probs: torch.Tensor  # L x K_s, rows sum to 1
    appearance_probs: torch.Tensor  # L x K_a
    grid: tuple[int, int]  # (h, w) token grid
    label_names: list[str]
    name: str = "weak: marginal tokens"

    @classmethod
    def from_tokens(cls, cache: Mapping, label_names: Sequence[str] | None = None) -> "MarginalTokenGenerator":
        """From a token cache dict: "structure" / "appearance" (M x h x w), "labels" (M,)."""
        s, a = torch.as_tensor(cache["structure"]).long(), torch.as_tensor(cache["appearance"]).long()
        labels = torch.as_tensor(cache["labels"]).long()
        if s.ndim != 3 or s.shape != a.shape or len(labels) != len(s):
            raise ValueError(f"token cache shapes do not fit: structure {tuple(s.shape)}, "
                             f"appearance {tuple(a.shape)}, labels {tuple(labels.shape)}")
        names = list(label_names or cache.get("label_names") or [str(i) for i in range(int(labels.max()) + 1)])
        k_s = int(cache.get("num_structure_codes") or int(s.max()) + 1)
        k_a = int(cache.get("num_appearance_codes") or int(a.max()) + 1)
        s_probs, a_probs = torch.zeros(len(names), k_s), torch.zeros(len(names), k_a)
        for li in range(len(names)):
            rows = labels == li
            if rows.any():
                s_probs[li] = torch.bincount(s[rows].flatten(), minlength=k_s).double().div(rows.sum() * s[0].numel()).float()
                a_probs[li] = torch.bincount(a[rows].flatten(), minlength=k_a).double().div(rows.sum() * a[0].numel()).float()
        return cls(s_probs, a_probs, (int(s.shape[1]), int(s.shape[2])), names)

    @classmethod
    def from_run(cls, run_dir: str | Path, label_names: Sequence[str] | None = None) -> "MarginalTokenGenerator":
        path = Path(run_dir) / "tokens" / "train_tokens.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; the weak baseline needs the run's training token cache")
        return cls.from_tokens(torch.load(path, map_location="cpu", weights_only=False), label_names)

    def has_label(self, label: int) -> bool:
        return bool(self.structure_probs[label].sum() > 0)

    def sample_tokens(self, labels: Sequence[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, A) token grids, each B x h x w long, every position drawn independently."""
        missing = sorted({int(li) for li in labels if not self.has_label(int(li))})
        if missing:
            raise ValueError(f"no training tokens for label(s) {[self.label_names[i] for i in missing]}")
        gen = torch.Generator().manual_seed(seed)
        h, w = self.grid
        idx = torch.as_tensor(list(labels), dtype=torch.long)
        s = torch.multinomial(self.structure_probs[idx], h * w, replacement=True, generator=gen)
        a = torch.multinomial(self.appearance_probs[idx], h * w, replacement=True, generator=gen)
        return s.view(-1, h, w), a.view(-1, h, w)

    @torch.no_grad()
    def generate(self, tokenizer, labels: Sequence[int], device: torch.device | str = "cpu", seed: int = 0,
                 batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded pairs like ``Generator.generate``: (uint8 images B x 3 x P x P, {0,1} masks B x 1 x P x P)."""
        s, a = self.sample_tokens(labels, seed)
        images, masks = [], []
        for start in range(0, len(s), batch_size):
            img, msk = tokenizer.decode(s[start:start + batch_size].to(device), a[start:start + batch_size].to(device))
            images.append(img.cpu())
            masks.append(msk.cpu())
        return torch.cat(images), torch.cat(masks)
