"""Trained evaluators (style classifier, segmenter), local-weight feature spaces, and the report."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import block_network
from pathar_aug.evaluation import (
    LPIPS,
    ColourTextureFeatures,
    EvalConfig,
    FeatureExtractor,
    Segmenter,
    SegmenterConfig,
    StyleClassifier,
    StyleClassifierConfig,
    StyleClassifierFeatures,
    TimmFeatures,
    evaluate_sets,
    extract_cached,
)
from pathar_aug.evaluation import report as report_mod

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing may download weights."""
    block_network(monkeypatch)


# ---------------------------------------------------------------------------- synthetic nuclei
STYLES = {
    # background, nucleus colour: an H&E-like and a fluorescence-like label
    "histo": ((225, 175, 200), (95, 45, 130)),
    "fluo": ((12, 12, 18), (70, 90, 235)),
}


def make_pairs(label: str, n: int, seed: int, size: int = 48, radius=(3, 6)) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    bg, fg = (np.array(c, np.float64) for c in STYLES[label])
    yy, xx = np.mgrid[:size, :size]
    pairs = []
    for _ in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.integers(6, size - 6, 2)
            ry, rx = rng.integers(*radius, 2)
            mask[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        img = np.where(mask[..., None] > 0, fg, bg) + rng.normal(0, 10, (size, size, 3))
        pairs.append((np.clip(img, 0, 255).astype(np.uint8), mask))
    return pairs


def add_noise(pairs, sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(np.clip(i + rng.normal(0, sigma, i.shape), 0, 255).astype(np.uint8), m) for i, m in pairs]


FAST_STYLE = StyleClassifierConfig(image_size=32, crop=24, width=8, steps=40, batch_size=16, lr=5e-3)
FAST_SEG = SegmenterConfig(image_size=48, crop=32, width=8, steps=80, batch_size=8, lr=5e-3)


@pytest.fixture(scope="module")
def real():
    return {label: make_pairs(label, 40, seed=i) for i, label in enumerate(STYLES)}


@pytest.fixture(scope="module")
def classifier(real):
    return StyleClassifier.fit({lb: [i for i, _ in p] for lb, p in real.items()}, FAST_STYLE, "cpu", progress=False)


@pytest.fixture(scope="module")
def segmenter(real):
    return Segmenter.fit([p for pairs in real.values() for p in pairs], FAST_SEG, "cpu", progress=False)


# ---------------------------------------------------------------------------- style classifier
def test_style_classifier_separates_two_easy_labels(classifier, tmp_path):
    fresh = {lb: [i for i, _ in make_pairs(lb, 20, seed=100 + k)] for k, lb in enumerate(STYLES)}
    for label, imgs in fresh.items():
        assert classifier.style_score(imgs, label) >= 0.95
    assert classifier.style_score(fresh["histo"], "fluo") <= 0.05  # wrong conditioning label
    assert classifier.val_accuracy is not None and classifier.val_accuracy >= 0.95

    path = tmp_path / "clf.pt"
    classifier.save(path)
    loaded = StyleClassifier.load(path, "cpu")
    assert loaded.labels == classifier.labels and loaded.fingerprint == classifier.fingerprint
    np.testing.assert_allclose(loaded.embed(fresh["fluo"]), classifier.embed(fresh["fluo"]), atol=1e-5)


# --------------------------------------------------------------------------------- segmenter
def test_segmenter_agrees_with_coherent_pairs_only(segmenter, tmp_path):
    fresh = make_pairs("histo", 12, seed=200) + make_pairs("fluo", 12, seed=201)
    coherent = segmenter.dice_against(fresh).mean()
    shuffled = [(img, fresh[(k + 5) % len(fresh)][1]) for k, (img, _) in enumerate(fresh)]
    mismatched = segmenter.dice_against(shuffled).mean()
    assert coherent > 0.8
    assert mismatched < coherent - 0.4
    path = tmp_path / "seg.pt"
    segmenter.save(path)
    loaded = Segmenter.load(path, "cpu")
    assert loaded.fingerprint == segmenter.fingerprint
    np.testing.assert_allclose(loaded.dice_against(fresh[:4]), segmenter.dice_against(fresh[:4]))


def test_segmenter_predicts_at_input_resolution(segmenter):
    img, _ = make_pairs("fluo", 1, seed=3, size=80)[0]
    assert segmenter.predict([img])[0].shape == (80, 80)


# ---------------------------------------------------------------------- local-weight backbones
def test_timm_features_from_local_checkpoint(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # DDP-style prefix inside a {'model': ...} container, classifier head included
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "r18.pth")
    ext = TimmFeatures("resnet18", tmp_path / "r18.pth", image_size=32, device="cpu")
    assert ext.name == "resnet18[r18.pth]" and ext.unexpected_keys == ["fc.weight", "fc.bias"]
    imgs = [i for i, _ in make_pairs("histo", 3, seed=1)]
    feats = ext.extract(imgs)
    assert feats.shape == (3, 512) and np.isfinite(feats).all()
    # weights really loaded: same numbers as the source network's pooled features
    x = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        ref = src.eval().forward_head(src.forward_features((x - ext.mean) / ext.std), pre_logits=True)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-4)


def test_timm_vit_checkpoint_is_resampled_to_another_size(tmp_path):
    timm = pytest.importorskip("timm")
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    ext = TimmFeatures("vit_tiny_patch16_224", tmp_path / "vit.pth", name="test-vit", device="cpu",
                       model_kwargs={"img_size": 64})
    assert ext.image_size == (64, 64)
    assert ext.extract([i for i, _ in make_pairs("fluo", 2, seed=2)]).shape == (2, 192)


def test_timm_features_refuse_wrong_or_missing_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="parameters missing"):
        TimmFeatures("resnet34", tmp_path / "r18.pth", device="cpu")
    with pytest.raises(FileNotFoundError):
        TimmFeatures("resnet18", tmp_path / "absent.pth", device="cpu")
    with pytest.raises(ValueError, match="needs the network"):
        TimmFeatures("hf-hub:MahmoodLab/UNI", tmp_path / "r18.pth", device="cpu")


def _random_lpips_files(tmp_path, net: str = "alex"):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.alexnet(weights=None)
    torch.save(model.state_dict(), tmp_path / "alexnet.pth")
    chans = (64, 192, 384, 256, 256)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(chans)}, tmp_path / "lin.pth")
    return model, tmp_path / "alexnet.pth", tmp_path / "lin.pth"


def test_lpips_matches_reference_formula_and_is_zero_for_identical(tmp_path):
    model, backbone, lin = _random_lpips_files(tmp_path)
    lp = LPIPS("alex", backbone, lin, device="cpu")
    assert lp.name == "lpips-alex"
    imgs = [i for i, _ in make_pairs("histo", 6, seed=5, size=64)]
    assert np.allclose(lp.distance(imgs[:2], imgs[:2]), 0.0, atol=1e-9)

    # reference: LPIPS v0.1 written out directly (scale, unit-normalise, weighted sq diff, mean HW)
    lin_w = torch.load(lin, weights_only=True)
    cuts, feats = (0, 2, 5, 8, 10, 12), model.features.eval()

    def ref(a, b):
        ta, tb = (torch.from_numpy(np.stack(v)).permute(0, 3, 1, 2).float() / 255 for v in (a, b))
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        ha, hb = (ta * 2 - 1 - shift) / scale, (tb * 2 - 1 - shift) / scale
        total = 0
        with torch.no_grad():
            for i in range(5):
                ha, hb = feats[cuts[i]:cuts[i + 1]](ha), feats[cuts[i]:cuts[i + 1]](hb)
                na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + F.conv2d((na - nb) ** 2, lin_w[f"lin{i}.model.1.weight"]).mean((1, 2, 3))
        return total.numpy()

    np.testing.assert_allclose(lp.distance(imgs[:3], imgs[3:]), ref(imgs[:3], imgs[3:]), rtol=1e-4)
    # mean over all pairs (Gram form) equals the mean of direct pair distances
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    direct = lp.distance([imgs[i] for i, _ in pairs], [imgs[j] for _, j in pairs]).mean()
    mean, used = lp.mean_pairwise(imgs, image_size=None)
    assert used == 6 and mean == pytest.approx(direct, rel=1e-4)
    # diversity: a set of copies has none, noise adds some
    assert lp.mean_pairwise([imgs[0]] * 5, image_size=None)[0] == pytest.approx(0.0, abs=1e-8)
    noisy = [i for i, _ in add_noise([(imgs[0], None)] * 5, 40)]
    assert lp.mean_pairwise(noisy, image_size=None)[0] > 1e-3


def test_lpips_from_local_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert LPIPS.from_local("alex") is None  # nothing cached: no LPIPS, and no download attempt
    _, backbone, _ = _random_lpips_files(tmp_path)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    backbone.rename(tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    monkeypatch.setattr("pathar_aug.evaluation.diversity._lpips_package_weights", lambda net: None)
    lp = LPIPS.from_local("alex", device="cpu")
    assert lp is not None and lp.name == "lpips-alex-unweighted"


# --------------------------------------------------------------------------------- caching
def test_feature_cache_reuses_and_keys_on_content(tmp_path):
    class Counting(ColourTextureFeatures):
        calls = 0

        def extract(self, images):
            Counting.calls += 1
            return super().extract(images)

    ext = Counting()
    assert isinstance(ext, FeatureExtractor)
    imgs = [i for i, _ in make_pairs("histo", 4, seed=9)]
    a = extract_cached(ext, imgs, tmp_path)
    b = extract_cached(ext, imgs, tmp_path)
    assert Counting.calls == 1 and np.array_equal(a, b)
    extract_cached(ext, [imgs[0] + 1, *imgs[1:]], tmp_path)
    assert Counting.calls == 2


# ---------------------------------------------------------------------------------- report
def test_evaluate_sets_end_to_end(real, classifier, segmenter, tmp_path):
    # held-out real pairs act as the "perfect generator"; copies of the real set score ideal
    held_out = {lb: make_pairs(lb, 30, seed=50 + k) for k, lb in enumerate(STYLES)}
    generated = {
        "copy": {lb: list(p) for lb, p in real.items()},
        "held_out": held_out,
        "noisy": {lb: add_noise(p, 45, seed=k) for k, (lb, p) in enumerate(held_out.items())},
        # right images, masks of other images: structure statistics fine, pairs incoherent
        "mask_shuffled": {lb: [(i, p[(k + 7) % len(p)][1]) for k, (i, _) in enumerate(p)] for lb, p in held_out.items()},
        # every image coloured like the other label: style fails
        "label_swapped": {"histo": held_out["fluo"], "fluo": held_out["histo"]},
        "big_nuclei": {lb: make_pairs(lb, 30, seed=70 + k, radius=(9, 13)) for k, lb in enumerate(STYLES)},
        # mode collapse: one sample repeated
        "collapsed": {lb: [p[0]] * 30 for lb, p in held_out.items()},
        # half the images show nuclei their (empty) masks do not have
        "half_empty": {lb: [(i, np.zeros_like(m)) for i, m in p[:15]] + p[15:] for lb, p in held_out.items()},
    }
    _, backbone, lin = _random_lpips_files(tmp_path)
    lpips = LPIPS("alex", backbone, lin, device="cpu")
    cfg = EvalConfig(kid_subsets=10, progress=False, grid_samples=4, grid_cell=48, device="cpu",
                     lpips_image_size=64, lpips_max_images=16)
    df = evaluate_sets(real, generated, None, tmp_path / "out", tmp_path / "cache", config=cfg,
                       style_classifier=classifier, segmenter=segmenter, lpips=lpips)

    def v(set_name, metric, space=None, label="(mean)"):
        sel = (df["set"] == set_name) & (df["metric"] == metric) & (df["label"] == label)
        if space is not None:
            sel &= df["feature_space"] == space
        assert sel.sum() == 1, (set_name, metric, space, label)
        return float(df.loc[sel, "value"].iloc[0])

    spaces = {"style-classifier", "colour-texture-histograms"}
    assert spaces <= set(df["feature_space"])
    for space in spaces:
        assert v("copy", "fid", space) == pytest.approx(0, abs=1e-6)
        assert v("copy", "precision", space) == 1.0 and v("copy", "recall", space) == 1.0
        assert v("noisy", "fid", space) > 5 * v("held_out", "fid", space)
        assert v("noisy", "kid", space) > v("held_out", "kid", space)
        assert v("noisy", "precision", space) < v("held_out", "precision", space)
    for m in ("nuclei_per_patch_w1", "area_w1_px", "eccentricity_w1", "foreground_fraction_w1"):
        assert v("copy", m) == pytest.approx(0, abs=1e-9)
    assert v("big_nuclei", "area_w1_px") > 5 * v("held_out", "area_w1_px")
    assert v("held_out", "style_score") >= 0.95 and v("label_swapped", "style_score") <= 0.05
    assert v("held_out", "image_mask_dice") > 0.8
    assert v("mask_shuffled", "image_mask_dice") < v("held_out", "image_mask_dice") - 0.4
    # apart: masks with nuclei agree, empty masks under images with nuclei do not
    assert v("half_empty", "image_mask_dice_on_masks_with_nuclei") > 0.8
    assert v("half_empty", "image_mask_dice_on_empty_masks") < 0.2
    assert v("half_empty", "image_mask_dice") == pytest.approx(
        (v("half_empty", "image_mask_dice_on_masks_with_nuclei") + v("half_empty", "image_mask_dice_on_empty_masks")) / 2)
    split = df[(df["set"] == "half_empty") & (df["label"] == "histo") & (df["metric"] == "image_mask_dice_on_empty_masks")]
    assert split["n_gen"].tolist() == [15]
    assert not ((df["set"] == "held_out") & (df["metric"] == "image_mask_dice_on_empty_masks")).any()  # none empty
    # the real set's own descriptive rows are present as the reference
    assert v("real", "area_mean_px") == pytest.approx(v("copy", "area_mean_px"))
    # diversity: a collapsed set has none, held-out real data about as much as the real set
    for space in spaces:
        assert v("collapsed", "mean_pairwise_l2", space) == pytest.approx(0, abs=1e-5)
        assert v("held_out", "mean_pairwise_l2", space) == pytest.approx(v("real", "mean_pairwise_l2", space), rel=0.3)
        assert v("collapsed", "recall", space) < 0.2 < v("held_out", "recall", space)
    assert v("collapsed", "lpips", "lpips-alex") == pytest.approx(0, abs=1e-6)
    assert v("held_out", "lpips", "lpips-alex") == pytest.approx(v("real", "lpips", "lpips-alex"), rel=0.3)
    # every row carries its N; per-label rows plus the label mean
    assert set(df["label"]) == {"histo", "fluo", "(mean)"}
    row = df[(df["label"] == "histo") & (df["set"] == "noisy") & (df["metric"] == "fid")].iloc[0]
    assert (row["n_real"], row["n_gen"]) == (40, 30)

    out = tmp_path / "out"
    assert {"metrics.csv", "metrics.md", "metadata.json", "grid_histo.png", "grid_fluo.png"} <= {p.name for p in out.iterdir()}
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), df.reset_index(drop=True), check_dtype=False)
    md = (out / "metrics.md").read_text()
    assert "## Feature space: `style-classifier`" in md and "| label | set | N real | N gen |" in md
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["style_classifier_val_accuracy"] == classifier.val_accuracy
    from PIL import Image

    assert Image.open(out / "grid_histo.png").size[1] == 9 * (48 + 2)  # real + eight sets


def test_evaluate_sets_trains_once_then_uses_caches(real, tmp_path, monkeypatch):
    cfg = EvalConfig(kid_subsets=5, progress=False, device="cpu",
                     style=StyleClassifierConfig(image_size=32, crop=24, width=8, steps=15),
                     segmenter=SegmenterConfig(image_size=32, crop=24, width=8, steps=15))
    small_real = {lb: p[:12] for lb, p in real.items()}
    gen = {"model": {lb: p[12:20] for lb, p in real.items()}}
    t0 = time.perf_counter()
    first = evaluate_sets(small_real, gen, cache_dir=tmp_path, config=cfg)
    first_time = time.perf_counter() - t0
    cached = {p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_file()}
    assert cached == {"style_classifier", "segmenter"}
    n_files = len(list((tmp_path / "features").glob("*.npy")))
    assert n_files == 2 * 2 * 2  # labels x (real, model) x feature spaces

    def boom(*args, **kwargs):
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setattr(StyleClassifier, "fit", boom)
    monkeypatch.setattr(Segmenter, "fit", boom)
    calls = []
    orig = report_mod.extract_cached

    def spy(extractor, images, cache_dir=None):
        calls.append(cache_dir)
        return orig(extractor, images, cache_dir)

    monkeypatch.setattr(report_mod, "extract_cached", spy)
    t0 = time.perf_counter()
    second = evaluate_sets(small_real, gen, cache_dir=tmp_path, config=cfg)
    assert time.perf_counter() - t0 < first_time
    pd.testing.assert_frame_equal(first, second)
    assert len(calls) == 8 and len(list((tmp_path / "features").glob("*.npy"))) == n_files  # all hits


def test_evaluate_sets_single_label_and_user_extractor(real, classifier):
    cfg = EvalConfig(kid_subsets=5, progress=False, train_segmenter=False, device="cpu")
    df = evaluate_sets({"histo": real["histo"]}, {"g": {"histo": real["histo"][:10]}},
                       [StyleClassifierFeatures(classifier, name="clf")], config=cfg)
    assert set(df["feature_space"]) == {"clf", "masks", "texture"}
    assert "style_score" not in set(df["metric"]) and "image_mask_dice" not in set(df["metric"])
    with pytest.raises(ValueError, match="reserved"):
        evaluate_sets(real, {"real": real}, config=cfg)
    with pytest.raises(ValueError, match="without real images"):
        evaluate_sets({"histo": real["histo"]}, {"g": {"other": real["histo"]}}, config=cfg)
