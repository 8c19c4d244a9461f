"""`pathar-aug evaluate` end to end on the tiny preset with real files, and its weak baseline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.evaluation.run import FLOOR, FLOOR_SPLIT, MODEL, RECON, WEAK, parse_feature_spec, scale_check
from pathar_aug.evaluation.sets import MODEL_FILTERED, SWAP
from pathar_aug.evaluation.inputs import dinov2_arch as _dinov2_arch
from pathar_aug.evaluation.weak_generator import MarginalTokenGenerator
from tests.conftest import block_network, train_tiny_run, write_pair_folders

runner = CliRunner()
torch.set_num_threads(2)

# small evaluator training and KID settings: the whole file stays within a couple of minutes
FAST = ["--classifier-steps", "15", "--segmenter-steps", "15", "--kid-subsets", "10", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No test here may open a connection (weights are never downloaded), training included."""
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny model trained once through the CLI on two labels of real PNG files."""
    run = train_tiny_run(tmp_path_factory.mktemp("evaluate"), "--tokenizer-steps", "10", "--prior-steps", "10")
    return {**run, "cache": run["root"] / "cache"}


@pytest.fixture(scope="module")
def timm_weights(trained) -> Path:
    """A local weights file for a small timm architecture (stands in for DINOv2 / UNI weights)."""
    import timm

    path = trained["root"] / "test_resnet.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict(), path)
    return path


def evaluate(trained, *args: str):
    return runner.invoke(app, ["evaluate", "--model", str(trained["run"]), "--images", str(trained["images"]),
                               "--masks", str(trained["masks"]), "--cache", str(trained["cache"]), *FAST, *args])


# ------------------------------------------------------------------------------------ end to end
def test_evaluate_writes_tables_grids_and_rerun_uses_caches(trained, timm_weights, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    spec = f"timm:test_resnet={timm_weights},name=my-resnet,image_size=64"
    # every candidate passes at agreement 0: the filtered set then holds 8 of 16 draws (the first, as drawn)
    args = ["--n", "8", "--out", str(out), "--features", "style", "--features", "colour-texture", "--features", spec,
            "--min-agreement", "0"]
    res = evaluate(trained, *args)
    assert res.exit_code == 0, res.output
    for name in ("metrics.csv", "metrics.md", "metadata.json", "scale_check.csv", "grid_bright.png", "grid_dark.png"):
        assert (out / name).is_file(), name

    df = pd.read_csv(out / "metrics.csv")
    assert set(df["set"]) == {"real", FLOOR, RECON, SWAP, MODEL, MODEL_FILTERED, WEAK}
    # the run's quality filter picks the filtered set from 2 n draws; the first n are the model's set
    filtered = df[(df["set"] == MODEL_FILTERED) & (df["label"] == "bright")]
    assert (filtered["n_gen"] == 8).all() and "image_mask_dice" in set(filtered["metric"])
    swap = df[(df["set"] == SWAP) & (df["metric"] == "swap_consistency") & (df["label"] != "(mean)")]
    assert len(swap) == 2 and swap["value"].between(0, 1).all()
    assert (swap["value"].values == df[(df["set"] == SWAP) & (df["metric"] == "image_mask_dice")
                                       & (df["label"] != "(mean)")]["value"].values).all()
    assert {"style-classifier", "colour-texture-histograms", "my-resnet", "masks", "segmenter"} <= set(df["feature_space"])
    assert set(df["label"]) == {"bright", "dark", "(mean)"}
    model = df[(df["set"] == MODEL) & (df["label"] == "bright")]
    for metric in ("kid", "fid", "precision", "recall", "mean_pairwise_l2", "style_score", "image_mask_dice",
                   "nuclei_per_patch_w1", "area_w1_px"):
        assert metric in set(model["metric"]), metric
    assert (model["n_gen"] == 8).all()  # N per label, stated on every row
    # the reference is the run's held-out image of each label: one 64 px image = four 32 px patches
    assert (df[(df["set"] == "real") & (df["label"] == "bright")]["n_real"] == 4).all()
    assert not df[df["metric"] == "lpips"].shape[0]  # no local LPIPS weights here: never named LPIPS

    md = (out / "metrics.md").read_text()
    assert "## Feature space: `my-resnet`" in md and "Scale check" in md and "mean_pairwise_l2" in md
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["n_per_label"] == 8 and "held-out" in meta["reference"]["bright"]
    check = pd.read_csv(out / "scale_check.csv")
    assert {"floor", "model", "weak", "verdict"} <= set(check.columns)
    assert set(check["label"]) >= {"bright", "dark"} and set(check["metric"]) >= {"kid", "fid", "style_score"}
    grid = Image.open(out / "grid_bright.png")
    assert grid.size[1] == 7 * (96 + 2)  # real, floor, reconstructions, swaps, model, filtered, weak

    # a re-run with the same settings touches no model: sets, features, classifier, segmenter cached
    from pathar_aug.evaluation import features, segmenter, style_classifier, weak_generator
    from pathar_aug import generator

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    for cls, name in ((generator.Generator, "generate"), (weak_generator.MarginalTokenGenerator, "generate"),
                      (style_classifier.StyleClassifier, "fit"), (segmenter.Segmenter, "fit"),
                      (features.ColourTextureFeatures, "extract"), (features.TimmFeatures, "extract"),
                      (features.StyleClassifierFeatures, "extract")):
        monkeypatch.setattr(cls, name, boom)
    again = evaluate(trained, *[a if a != str(out) else str(tmp_path / "again") for a in args])
    assert again.exit_code == 0, again.output
    assert "from cache" in again.output
    pd.testing.assert_frame_equal(df, pd.read_csv(tmp_path / "again" / "metrics.csv"))


def test_synthetic_nnunet_dataset_and_plain_folders(trained, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    res = runner.invoke(app, ["import", "--images", str(trained["images"]), "--masks", str(trained["masks"]),
                              "--into", "Dataset502_Eval"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["synthesize", "--model", str(trained["run"]), "--into", "502", "--n", "2",
                              "--per-label", "--batch-size", "4", "--no-filter"])  # exact counts: unfiltered
    assert res.exit_code == 0, res.output
    dataset = raw / "Dataset502_Eval"

    # pairs already written, judged with the model's reference rows (no new sampling)
    res = evaluate(trained, "--n", "8", "--out", str(tmp_path / "nn"), "--synthetic", str(dataset))
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "nn" / "metrics.csv")
    judged = "synthetic: Dataset502_Eval"
    assert MODEL not in set(df["set"]) and {judged, FLOOR, WEAK} <= set(df["set"])
    assert (df[(df["set"] == judged) & (df["label"] != "(mean)")]["n_gen"] == 2).all()  # synthetic cases only
    assert set(pd.read_csv(tmp_path / "nn" / "scale_check.csv")["label"]) >= {"bright", "dark"}

    # plain images/ + masks/ folders, no model: real images split in two by source image for the floor
    syn = tmp_path / "plain"
    write_pair_folders(syn, n=6, size=32, labels=("bright", "dark"), seed=5)
    res = runner.invoke(app, ["evaluate", "--synthetic", str(syn), "--images", str(trained["images"]),
                              "--masks", str(trained["masks"]), "--n", "8", "--out", str(tmp_path / "pl"), *FAST])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(tmp_path / "pl" / "metrics.csv")
    assert set(df["set"]) == {"real", FLOOR_SPLIT, "synthetic: plain"}
    assert (tmp_path / "pl" / "grid_dark.png").is_file()


def test_bad_input_is_one_clear_error(trained, tmp_path):
    def run(*args: str):
        res = runner.invoke(app, ["evaluate", *args, *FAST, "--out", str(tmp_path / "x")])
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output
        return " ".join(res.output.split())

    model = ["--model", str(trained["run"])]
    real = ["--images", str(trained["images"]), "--masks", str(trained["masks"])]
    assert "does not exist" in run(*model, "--images", str(tmp_path / "nope"), "--masks", str(trained["masks"]))
    other, other_masks = write_pair_folders(tmp_path / "other", n=4, size=64, labels=("bright", "purple"))
    assert "'purple' is unknown to this model" in run(*model, "--images", str(other), "--masks", str(other_masks))
    broken = tmp_path / "broken"
    shutil.copytree(trained["run"], broken, ignore=shutil.ignore_patterns("prior.pt"))
    assert "incomplete" in run("--model", str(broken), *real)
    assert "not a pathar-aug run folder" in run("--model", str(tmp_path), *real)
    assert "--synthetic" in run(*real)  # neither a model nor pairs to judge
    assert "does not exist" in run(*model, *real, "--features", f"timm:test_resnet={tmp_path / 'missing.pth'}")
    assert "not understood" in run(*model, *real, "--features", "inception")
    assert "does not exist" in run(*model, *real, "--synthetic", str(tmp_path / "nothing"))
    assert "--n must be a positive" in run(*model, *real, "--n", "0")


# --------------------------------------------------------------------------------- weak baseline
def test_marginal_token_generator_matches_per_label_frequencies():
    rng = np.random.default_rng(0)
    m, h, w = 40, 4, 4
    # label 0 only uses structure tokens {0, 1} (3:1) and appearance token 5; label 1 tokens {2, 3}
    s = np.where(rng.random((m, h, w)) < 0.75, 0, 1)
    s[m // 2:] += 2
    a = np.full((m, h, w), 5)
    a[m // 2:] = rng.integers(6, 8, (m // 2, h, w))
    cache = {"structure": torch.tensor(s), "appearance": torch.tensor(a),
             "labels": torch.tensor([0] * (m // 2) + [1] * (m // 2)), "label_names": ["x", "y"],
             "num_structure_codes": 8, "num_appearance_codes": 8}
    gen = MarginalTokenGenerator.from_tokens(cache)
    assert gen.grid == (4, 4) and gen.label_names == ["x", "y"]
    torch.testing.assert_close(gen.structure_probs.sum(1), torch.ones(2))
    ss, aa = gen.sample_tokens([0] * 500 + [1] * 500, seed=1)
    assert ss.shape == (1000, 4, 4) and ss.dtype == torch.long
    assert set(ss[:500].unique().tolist()) <= {0, 1} and set(ss[500:].unique().tolist()) <= {2, 3}
    assert (aa[:500] == 5).all() and set(aa[500:].unique().tolist()) <= {6, 7}
    share = (ss[:500] == 0).float().mean().item()
    assert abs(share - gen.structure_probs[0, 0].item()) < 0.03
    # positions are independent: a token says nothing about its right-hand neighbour
    left, right = (ss[:500, :, :-1] == 0).float(), (ss[:500, :, 1:] == 0).float()
    assert abs(((left - left.mean()) * (right - right.mean())).mean().item()) < 0.01
    assert torch.equal(gen.sample_tokens([1, 0], seed=3)[0], gen.sample_tokens([1, 0], seed=3)[0])


def test_marginal_token_generator_decodes_with_the_tokenizer(tmp_path):
    from pathar_aug.tokenizer import TOKENIZER_PRESETS, DualVQTokenizer

    tok = DualVQTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
    h, w = tok.cfg.grid
    cache = {"structure": torch.randint(0, 4, (6, h, w)), "appearance": torch.randint(0, 4, (6, h, w)),
             "labels": torch.tensor([0, 0, 0, 2, 2, 2]), "label_names": ["a", "b", "c"]}
    (tmp_path / "tokens").mkdir()
    torch.save(cache, tmp_path / "tokens" / "train_tokens.pt")
    gen = MarginalTokenGenerator.from_run(tmp_path)
    images, masks = gen.generate(tok, [0, 2, 2], "cpu", seed=0)
    p = tok.cfg.patch_size
    assert images.shape == (3, 3, p, p) and images.dtype == torch.uint8
    assert masks.shape == (3, 1, p, p) and set(masks.unique().tolist()) <= {0, 1}
    assert not gen.has_label(1)
    with pytest.raises(ValueError, match="no training tokens"):
        gen.sample_tokens([1])
    with pytest.raises(FileNotFoundError):
        MarginalTokenGenerator.from_run(tmp_path / "nowhere")


# ------------------------------------------------------------------------------- small pieces
def test_scale_check_places_the_model():
    rows = []
    for label, (f, mo, w) in {"a": (0.1, 0.5, 0.9), "b": (0.1, 0.95, 0.9), "c": (0.3, 0.2, 0.9)}.items():
        for s, v in ((FLOOR, f), (MODEL, mo), (WEAK, w)):
            rows.append(dict(label=label, set=s, feature_space="fs", metric="kid", value=v))
            rows.append(dict(label=label, set=s, feature_space="style-classifier", metric="style_score", value=1 - v))
    check = scale_check(pd.DataFrame(rows))
    verdict = {(r.label, r.metric): r.verdict for r in check.itertuples()}
    assert verdict[("a", "kid")] == verdict[("a", "style_score")] == "between"
    assert verdict[("b", "kid")] == verdict[("b", "style_score")] == "NOT better than weak"
    assert verdict[("c", "kid")] == verdict[("c", "style_score")] == "better than floor"


def test_feature_specs(tmp_path):
    assert parse_feature_spec("style") == "style"
    assert parse_feature_spec("colour-texture").name == "colour-texture-histograms"
    for bad in ("inception", "timm:resnet18", "dinov2:"):
        with pytest.raises((ValueError, FileNotFoundError)):
            parse_feature_spec(bad)
    fake = tmp_path / "dinov2_vits14.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384)}, fake)
    assert _dinov2_arch(fake) == ("vit_small_patch14_dinov2", "S")


def test_model_sampling_resumes_from_finished_chunks(tmp_path):
    from pathar_aug.evaluation.run import sample_model
    from pathar_aug.sampler import SamplingConfig

    class Counting:
        calls = 0

        def generate(self, labels, cfg, device):
            self.calls += 1
            g = torch.Generator().manual_seed(cfg.seed)
            images = torch.randint(0, 256, (len(labels), 3, 8, 8), generator=g, dtype=torch.uint8)
            return images, (images[:, :1] > 127).to(torch.uint8)

    gen, cfg = Counting(), SamplingConfig(batch_size=4, seed=3)
    first = sample_model(gen, [0] * 5 + [1] * 5, cfg, "cpu", chunk_dir=tmp_path / "chunks")
    assert gen.calls == 3 and first[0].shape == (10, 3, 8, 8)
    (tmp_path / "chunks" / "chunk00002.pt").unlink()  # as if interrupted during the last chunk
    again = sample_model(gen, [0] * 5 + [1] * 5, cfg, "cpu", chunk_dir=tmp_path / "chunks")
    assert gen.calls == 4  # only the missing chunk was sampled again
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
