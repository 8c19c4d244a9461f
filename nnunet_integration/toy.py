"""Tiny nuclei-like data (dark discs on a pink background) for tests and smoke runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nnunet_integration.atomic import atomic_write_json
from nnunet_integration.paths import make_dataset_json


def disc_case(rng: np.random.Generator, size: int = 64, max_discs: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 image, 0/1 uint8 mask) with 2..max_discs discs of radius 4-8 px."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, max_discs + 1))):
        cy, cx = rng.integers(8, size - 8, 2)
        r = int(rng.integers(4, 9))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    nucleus, background = np.array([90, 40, 140], np.float32), np.array([230, 200, 220], np.float32)
    image = np.where(mask[..., None] == 1, nucleus, background) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_real_dataset(dataset_dir: Path, n: int, size: int = 64, seed: int = 0,
                      prefix: str = "real") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A plain nnU-Net raw dataset (no listing, no manifest) as a user would have made it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (dataset_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dataset_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = {}
    for i in range(n):
        name = f"{prefix}{i:03d}"
        image, mask = disc_case(rng, size)
        Image.fromarray(image).save(dataset_dir / "imagesTr" / f"{name}_0000.png")
        Image.fromarray(mask).save(dataset_dir / "labelsTr" / f"{name}.png")
        cases[name] = (image, mask)
    dj = make_dataset_json(dataset_dir.name)
    dj["numTraining"] = n
    atomic_write_json(dataset_dir / "dataset.json", dj)
    return cases
