"""Shared test helpers: small real-looking image/mask folders written as real files."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# a small prior problem shared by the prior and sampler tests
GRID = (3, 4)
N = GRID[0] * GRID[1]
K_S, K_A, LABELS = 8, 16, 3

DEMO = Path(__file__).resolve().parent.parent / "pathar_aug" / "demo_data"


def disc_pair(size: int, rng: np.random.Generator, dark_background: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image with bright (or dark) discs and its binary mask."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(3, max(4, size // 6))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    base = np.where(mask[..., None] > 0, [200, 180, 220], [20, 20, 30]) if dark_background else \
        np.where(mask[..., None] > 0, [90, 40, 120], [230, 220, 235])
    image = np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    return image, mask


def touching_nuclei(size: int, rng: np.random.Generator, n: int = 12, radius: tuple[int, int] = (4, 9)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of bright nuclei on a dark background and its instance mask, nuclei touching:
    overlapping ellipses are split between their centres (each pixel goes to the ellipse it lies
    deepest in) and every nucleus is one connected region."""
    from scipy import ndimage

    yy, xx = np.mgrid[:size, :size]
    depth = np.full((n, size, size), np.inf)
    for i in range(n):
        (cy, cx), (a, b) = rng.integers(radius[1], size - radius[1], 2), rng.integers(*radius, 2)
        r = ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2
        depth[i] = np.where(r <= 1, r, np.inf)
    inside = np.isfinite(depth).any(axis=0)
    owner = np.where(inside, np.argmin(depth, axis=0) + 1, 0)
    instances = np.zeros((size, size), np.int32)
    for i in range(1, n + 1):  # keep the largest piece of a nucleus cut in two by its neighbours
        pieces, k = ndimage.label(owner == i)
        if k:
            sizes = ndimage.sum_labels(np.ones_like(pieces), pieces, range(1, k + 1))
            instances[pieces == 1 + int(np.argmax(sizes))] = i
    shade = np.where(instances[..., None] > 0, [200, 180, 220], [20, 20, 30])
    image = np.clip(shade + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    return image, instances


def write_pair_folders(root: Path, n: int = 4, size: int = 48, labels: tuple[str, ...] = (), seed: int = 0
                       ) -> tuple[Path, Path]:
    """images/ and masks/ folders of PNG pairs; with labels, one subfolder per label."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    for i in range(n):
        label = labels[i % len(labels)] if labels else ""
        image, mask = disc_pair(size, rng, dark_background=(i % 2 == 0))
        (images / label).mkdir(parents=True, exist_ok=True)
        (masks / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(images / label / f"case{i:03d}.png")
        Image.fromarray(mask * 255).save(masks / label / f"case{i:03d}.png")
    return images, masks


def write_instance_folders(root: Path, n: int = 4, size: int = 48, nuclei: int = 6, seed: int = 0
                           ) -> tuple[Path, Path]:
    """images/ and masks/ folders of PNG pairs of touching nuclei, the masks 16-bit instance ids."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        image, instances = touching_nuclei(size, rng, n=nuclei)
        Image.fromarray(image).save(images / f"cell{i:03d}.png")
        Image.fromarray(instances.astype(np.uint16)).save(masks / f"cell{i:03d}.png")
    return images, masks


@pytest.fixture
def pair_folders(tmp_path: Path) -> tuple[Path, Path]:
    return write_pair_folders(tmp_path)


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every attempt to open a connection raise: nothing may download weights."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def no_network(monkeypatch):
    """Network blocked for one test (test modules may also define their own, autouse, version)."""
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP barriers stall them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Hypothesis profiles for the input fuzz suite (tests/test_fuzz_inputs.py): "ci" (the default) is a
# few seconds of fixed examples; HYPOTHESIS_PROFILE=long explores many new ones, for runs by hand.
try:
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the 'test' extra; without it only the fuzz suite is skipped
    pass


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty nnU-Net raw / preprocessed / results folders, named in the environment as nnU-Net reads them."""
    dirs = {k: tmp_path / k for k in ("raw", "preprocessed", "results")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(dirs["raw"]))
    monkeypatch.setenv("nnUNet_preprocessed", str(dirs["preprocessed"]))
    monkeypatch.setenv("nnUNet_results", str(dirs["results"]))
    return dirs


def train_tiny_run(root: Path, *options: str, n: int = 10, size: int = 64,
                   labels: tuple[str, ...] = ("bright", "dark")) -> dict[str, Path]:
    """A tiny model trained through the CLI on real PNG folders written under ``root``."""
    from typer.testing import CliRunner

    from pathar_aug.cli import app

    images, masks = write_pair_folders(root / "data", n=n, size=size, labels=labels)
    result = CliRunner().invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                                      "--out", str(root / "run"), "--quiet", "--val-fraction", "0.2", *options])
    assert result.exit_code == 0, result.output
    return {"root": root, "images": images, "masks": masks, "run": root / "run"}
