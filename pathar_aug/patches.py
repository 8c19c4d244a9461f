"""Fixed-size training patches: split by source image, tile or pad, dihedral augmentation."""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from pathar_aug.ingest import IngestError, Sample


@dataclass
class PatchSet:
    """Patches as tensors, ready for a DataLoader or the tokenizer."""

    images: torch.Tensor  # M x 3 x P x P uint8
    masks: torch.Tensor  # M x 1 x P x P uint8 in {0, 1} (multi-class runs: class ids 0..K-1)
    labels: torch.Tensor  # M int64, index into label_names
    label_names: list[str]
    sources: list[str]  # the source image of each patch

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor | list[int]) -> "PatchSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return PatchSet(self.images[index], self.masks[index], self.labels[index], self.label_names,
                        [self.sources[i] for i in index.tolist()])


def split_by_image(samples: list[Sample], val_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out whole source images, per label, so no tile of a validation image reaches training.

    Every label keeps at least one training image; a label with a single image has no validation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda s: s.name)
        rng.shuffle(group)
        n_val = min(int(round(val_fraction * len(group))), len(group) - 1)
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def tile_starts(length: int, patch: int) -> list[int]:
    """Tile starts covering [0, length): evenly spaced, the last flush with the edge (overlap, no gap)."""
    if length <= patch:
        return [0]
    n = -(-length // patch)
    return [round(i * (length - patch) / (n - 1)) for i in range(n)]


def tile_sample(sample: Sample, patch: int, pad_small: bool = True, instances: bool = False
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut an image and its binary mask (``instances``: its instance ids; a multi-class sample: its
    class ids) into patch x patch tiles covering the whole image.

    Images smaller than the patch are padded (image by reflection, mask with background) when
    ``pad_small``; otherwise they are refused, since a resize would change nucleus size.
    """
    image, mask = sample.image, (sample.mask if instances or sample.multiclass else sample.binary_mask)
    h, w = mask.shape
    if h < patch or w < patch:
        if not pad_small:
            raise IngestError(f"{sample.image_path}: image {w}x{h} is smaller than the patch size {patch}")
        ph, pw = max(0, patch - h), max(0, patch - w)
        mode = "reflect" if ph < h and pw < w else "edge"  # reflect needs pad < size
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode=mode)
        mask = np.pad(mask, ((0, ph), (0, pw)))
        h, w = mask.shape
    return [(image[y:y + patch, x:x + patch], mask[y:y + patch, x:x + patch])
            for y in tile_starts(h, patch) for x in tile_starts(w, patch)]


def make_patches(samples: list[Sample], patch: int, label_names: list[str] | None = None,
                 pad_small: bool = True) -> PatchSet:
    """Tile every sample; label indices follow ``label_names`` (sorted labels by default)."""
    if not samples:
        raise IngestError("no images to make patches from")
    label_names = label_names or sorted({s.label for s in samples})
    index = {name: i for i, name in enumerate(label_names)}
    images, masks, labels, sources = [], [], [], []
    for s in samples:
        if s.label not in index:
            raise IngestError(f"{s.image_path}: label '{s.label}' is not one of {label_names}")
        for img, msk in tile_sample(s, patch, pad_small):
            images.append(img)
            masks.append(msk)
            labels.append(index[s.label])
            sources.append(s.name)
    return PatchSet(
        images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(np.stack(masks)).unsqueeze(1).to(torch.uint8).contiguous(),
        labels=torch.tensor(labels, dtype=torch.long),
        label_names=list(label_names),
        sources=sources,
    )


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 dihedral transforms (k in 0..7) on the last two axes: k%4 quarter turns, flip if k>=4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def random_dihedral(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random dihedral transform per sample, the same to image and mask."""
    ks = torch.randint(0, 8, (images.shape[0],), generator=generator).tolist()
    return (torch.stack([dihedral(im, k) for im, k in zip(images, ks)]),
            torch.stack([dihedral(m, k) for m, k in zip(masks, ks)]))
