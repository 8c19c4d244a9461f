"""Generation from a finished run: the tokenizer and prior loaded together, sampling and decoding,
mask-conditioned rendering, the run's sample preview."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pathar_aug.device import autocast
from pathar_aug.ingest import MASK_SUFFIXES, IngestError, find_files, read_mask
from pathar_aug.mask_classes import BINARY, MaskClasses, as_classes
from pathar_aug.patches import tile_starts
from pathar_aug.pipeline import (
    PATCHES_FILE,
    PRIOR_CKPT,
    RUN_FILE,
    RUN_PENDING,
    TOKENIZER_CKPT,
    RunError,
    RunInfo,
    checkpoint_done,
    load_patches,
)
from pathar_aug.preview import save_grid, to_rgb_tiles
from pathar_aug.prior import InterleavedPrior
from pathar_aug.sampler import SamplingConfig, sample_tokens
from pathar_aug.tokenizer import DualVQTokenizer
from pathar_aug.train_prior import load_prior
from pathar_aug.train_tokenizer import load_tokenizer


@dataclass
class Generator:
    """A trained run: tokenizer + prior + the label names they were trained with, and the mask
    classes (masks are generated as class ids 0 .. K-1, which are the classes' label ids)."""

    tokenizer: DualVQTokenizer
    prior: InterleavedPrior
    label_names: list[str]
    run_dir: Path
    classes: MaskClasses = BINARY
    mask_mode: str = "classes"
    # label indices whose every training image was gray: their images are made gray after decoding
    # (the decoder is shared by all labels and may tint them, the adversarial one visibly)
    gray_labels: frozenset[int] = frozenset()

    @property
    def patch_size(self) -> int:
        return self.tokenizer.cfg.patch_size

    def label_index(self, label: str) -> int:
        if label not in self.label_names:
            raise RunError(f"label '{label}' is unknown to this model; it knows: {', '.join(self.label_names)}")
        return self.label_names.index(label)

    @torch.no_grad()
    def generate(self, labels: list[int], sampling: SamplingConfig, device: torch.device,
                 structure: torch.Tensor | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample token grids and decode them: (uint8 images B x 3 x P x P, masks B x 1 x P x P:
        {0,1}, or the class ids of a multi-class run)."""
        s, a = sample_tokens(self.prior, labels, sampling, device, structure=structure, progress=progress)
        images, masks = [], []
        for start in range(0, len(labels), 64):
            with autocast(device):  # bf16 on CUDA
                img, msk = self.tokenizer.decode(s[start:start + 64].to(device), a[start:start + 64].to(device))
            images.append(img.cpu())
            masks.append(msk.cpu())
        return self._grayed(torch.cat(images), labels), torch.cat(masks)

    def _grayed(self, images: torch.Tensor, labels: list[int]) -> torch.Tensor:
        """The images of gray labels as the mean of their channels, on every channel."""
        rows = torch.tensor([label in self.gray_labels for label in labels])
        if rows.any():
            gray = images[rows].float().mean(dim=1, keepdim=True).round().to(images.dtype)
            images[rows] = gray.expand(-1, images.shape[1], -1, -1)
        return images

    @torch.no_grad()
    def render_masks(self, masks: torch.Tensor, label: int, sampling: SamplingConfig, device: torch.device,
                     progress=None) -> torch.Tensor:
        """Mask-conditioned rendering: encode the masks to S, sample A only, decode the images."""
        s = torch.cat([self.tokenizer.encode_structure(masks[i:i + 64].to(device)).cpu()
                       for i in range(0, len(masks), 64)])
        images, _ = self.generate([label] * len(masks), sampling, device, structure=s, progress=progress)
        return images


def load_generator(run_dir: str | Path, device: torch.device) -> Generator:
    """Load a finished run; an incomplete one is a clear error naming what is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists() and (run_dir / RUN_PENDING).exists():
        raise RunError(f"{run_dir} is incomplete: the data stage did not finish; "
                       f"finish it with `pathar-aug train --out {run_dir} --resume`")
    info = RunInfo.load(run_dir)
    settings = info.settings
    prior_config = run_dir / "prior" / "prior_config.json"
    prior_total = json.loads(prior_config.read_text())["total_steps"] if prior_config.exists() else None
    for path, steps, stage in ((TOKENIZER_CKPT, settings.tokenizer.total_steps, "tokenizer"),
                               (PRIOR_CKPT, prior_total, "prior")):
        if not (run_dir / path).exists() or steps is None or not checkpoint_done(run_dir / path, steps):
            raise RunError(f"{run_dir} is incomplete: the {stage} stage did not finish (no complete {path}); "
                           f"finish it with `pathar-aug train --out {run_dir} --resume`")
    tokenizer = load_tokenizer(run_dir / TOKENIZER_CKPT, device)
    prior = load_prior(run_dir / PRIOR_CKPT, device).eval()
    gray = info.gray_labels
    if gray is None:  # a run of an older version: from its training patches, where it kept them
        gray = _gray_labels_of_patches(run_dir)
    return Generator(tokenizer, prior, info.label_names, run_dir, info.mask_classes, info.settings.mask_mode,
                     frozenset(info.label_names.index(name) for name in gray))


def _gray_labels_of_patches(run_dir: Path) -> list[str]:
    """The gray labels (``ingest.gray_labels``) of a run's training and held-out patches; none
    where the run folder no longer holds them."""
    if not (run_dir / PATCHES_FILE).exists():
        return []
    colour = set()
    names = None
    for part in load_patches(run_dir):
        if part is None:
            continue
        names = part.label_names
        flat = part.images.flatten(2)
        not_gray = ((flat[:, 0] != flat[:, 1]) | (flat[:, 0] != flat[:, 2])).any(dim=1)
        colour |= set(part.labels[not_gray].tolist())
    return [] if names is None else [n for i, n in enumerate(names) if i not in colour]


def save_sample_preview(generator: Generator, path: Path, device: torch.device, per_label: int = 6,
                        sampling: SamplingConfig | None = None) -> Path:
    """One row per label: generated images, then the row of their masks."""
    labels = [li for li in range(len(generator.label_names)) for _ in range(per_label)]
    images, masks = generator.generate(labels, sampling or SamplingConfig(seed=0), device)
    rows = []
    for li in range(len(generator.label_names)):
        part = slice(li * per_label, (li + 1) * per_label)
        rows += [to_rgb_tiles(images[part]), to_rgb_tiles(masks[part], generator.classes.k)]
    return save_grid(rows, path)


def masks_as_patches(masks_dir: Path, patch: int, classes: MaskClasses = BINARY, mask_mode: str = "classes"
                     ) -> tuple[torch.Tensor, list[str]]:
    """Read every mask of a folder as the run's classes (``mask_classes.as_classes``: binary, class
    ids, or instance masks in border mode) and tile it to patch size for mask-conditioned rendering."""
    files = find_files(masks_dir, MASK_SUFFIXES)
    if not files:
        raise IngestError(f"{masks_dir}: no mask files found (looked for {', '.join(MASK_SUFFIXES)})")
    tiles, names = [], []
    for f in files:
        m = torch.from_numpy(as_classes(read_mask(f, classes.keeps_values(mask_mode)), classes, mask_mode, str(f)))
        h, w = m.shape
        m = torch.nn.functional.pad(m, (0, max(0, patch - w), 0, max(0, patch - h)))
        for y in tile_starts(m.shape[0], patch):
            for x in tile_starts(m.shape[1], patch):
                tiles.append(m[y:y + patch, x:x + patch])
                names.append(f"{f.stem}_y{y}x{x}")
    return torch.stack(tiles).unsqueeze(1), names
