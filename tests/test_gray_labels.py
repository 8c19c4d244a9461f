"""A label whose every training image is gray (brightfield, fluorescence) gets gray synthetic images,
whatever tint the shared decoder gives them."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.generator import load_generator
from pathar_aug.ingest import gray_labels, load_pairs
from pathar_aug.pipeline import RUN_FILE, RunInfo
from pathar_aug.sampler import SamplingConfig
from tests.conftest import write_pair_folders


def _gray_is(images: torch.Tensor) -> torch.Tensor:
    """Per image: R = G = B everywhere."""
    return ((images[:, 0] == images[:, 1]) & (images[:, 0] == images[:, 2])).flatten(1).all(dim=1)


def test_gray_labels_are_recorded_and_their_samples_come_out_gray(tmp_path, one_thread):
    images, masks = write_pair_folders(tmp_path / "data", n=10, size=64, labels=("colour", "gray"))
    for path in (images / "gray").glob("*.png"):  # the gray label: one channel, as a brightfield camera gives
        Image.open(path).convert("L").convert("RGB").save(path)
    assert gray_labels(load_pairs(images, masks)) == ["gray"]
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--images", str(images), "--masks", str(masks), "--preset", "tiny",
                                      "--out", str(run), "--quiet", "--val-fraction", "0.2",
                                      "--tokenizer-steps", "6", "--prior-steps", "6"])
    assert result.exit_code == 0, result.output
    assert RunInfo.load(run).gray_labels == ["gray"]

    generator = load_generator(run, torch.device("cpu"))
    assert generator.gray_labels == {generator.label_index("gray")}
    labels = [generator.label_index("colour")] * 4 + [generator.label_index("gray")] * 4
    sampled, _ = generator.generate(labels, SamplingConfig(seed=0), torch.device("cpu"))
    assert _gray_is(sampled[4:]).all()
    assert not _gray_is(sampled[:4]).any()  # a colour label keeps its colour

    # a run of an older version (no record) finds its gray labels in its training patches
    raw = json.loads((run / RUN_FILE).read_text())
    del raw["data"]["gray_labels"]
    (run / RUN_FILE).write_text(json.dumps(raw))
    assert load_generator(run, torch.device("cpu")).gray_labels == generator.gray_labels


def test_graying_keeps_the_grey_level_and_only_touches_gray_labels():
    from pathar_aug.generator import Generator

    generator = Generator(None, None, ["a", "b"], None, gray_labels=frozenset({1}))  # type: ignore[arg-type]
    images = torch.tensor(np.array([[[[10]], [[20]], [[40]]], [[[10]], [[20]], [[41]]]]), dtype=torch.uint8)
    out = generator._grayed(images.clone(), [0, 1])
    assert torch.equal(out[0], images[0])
    assert out[1].flatten().tolist() == [24, 24, 24]  # round((10 + 20 + 41) / 3) = round(23.67)
