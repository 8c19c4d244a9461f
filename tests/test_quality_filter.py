"""The quality filter: scores, selection rules on constructed pairs, the train stage, synthesize."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pathar_aug.cli import app
from pathar_aug.patches import PatchSet
from pathar_aug.quality_filter import (
    FILTER_DIR, STATS_FILE, LabelStats, QualityFilter, agreement_threshold, empty_full_shares, quota,
    real_statistics,
)
from tests.conftest import disc_pair, train_tiny_run

runner = CliRunner()
SIZE = 32


class BrightSegmenter:
    """Stands in for the filter's network: foreground wherever the image is bright."""

    def predict(self, images, threshold: float = 0.5) -> list[np.ndarray]:
        return [np.asarray(i).mean(-1) > 110 for i in images]


def stats(threshold: float = 0.6, empty: float = 0.0, full: float = 0.0) -> LabelStats:
    return LabelStats(n_train=100, empty_share=empty, full_share=full, threshold=threshold,
                      agreement_source="heldout", agreement_n=50, agreement_mean=0.8)


def make_filter(**kw) -> QualityFilter:
    return QualityFilter(BrightSegmenter(), {"nuc": stats(**kw)})


def matched(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = disc_pair(SIZE, np.random.default_rng(seed))  # bright discs on dark
    return image, mask


def mismatched(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = matched(seed)
    return image, np.roll(np.rot90(mask), SIZE // 2, axis=0)  # the discs are elsewhere


def empty_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(10, 40, (SIZE, SIZE, 3)).astype(np.uint8), np.zeros((SIZE, SIZE), np.uint8)


def full_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(200, 240, (SIZE, SIZE, 3)).astype(np.uint8), np.ones((SIZE, SIZE), np.uint8)


def split(pairs):
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_agreeing_pairs_are_kept_and_disagreeing_ones_dropped():
    pairs = [matched(0), mismatched(1), matched(2), mismatched(3), matched(4)]
    sel = make_filter().select(*split(pairs), "nuc")
    assert sorted(sel.kept) == [0, 2, 4]
    assert [s.passed for s in sel.scores] == [True, False, True, False, True]
    assert all(sel.scores[i].agreement > 0.9 for i in (0, 2, 4))
    assert all(sel.scores[i].agreement < 0.6 for i in (1, 3))
    assert sel.candidates == 5 and sel.passed == 3 and sel.acceptance == pytest.approx(0.6)
    # keep: the best first, never more than asked, never a pair under the threshold
    sel = make_filter().select(*split(pairs), "nuc", keep=2, order="agreement")
    assert len(sel.kept) == 2 and set(sel.kept) <= {0, 2, 4}
    assert sel.scores[sel.kept[0]].agreement >= sel.scores[sel.kept[1]].agreement
    assert make_filter().select(*split(pairs), "nuc", min_agreement=0.0).passed == 5
    # generator layout (3 x H x W images, 1 x H x W masks as tensors) scores the same
    images = [torch.from_numpy(i).permute(2, 0, 1) for i, _ in pairs]
    masks = [torch.from_numpy(m)[None] for _, m in pairs]
    assert make_filter().select(images, masks, "nuc").kept == sel_kept_default(pairs)


def test_draw_order_keeps_the_first_passing_pairs_not_the_best():
    # ranking keeps the highest Dice wherever it was drawn (Dice favours large nuclei); draw order
    # keeps the first pairs that pass
    pairs = [mismatched(9)] + [matched(i) for i in range(6)]
    filt = make_filter(threshold=0.0)
    best = filt.select(*split(pairs), "nuc", keep=3, order="agreement")
    drawn = filt.select(*split(pairs), "nuc", keep=3)  # the default order
    assert drawn.kept == [0, 1, 2]  # threshold 0: every pair passes, the first three are kept as drawn
    assert [drawn.scores[i].agreement for i in best.kept] == sorted((s.agreement for s in drawn.scores), reverse=True)[:3]
    # the threshold still drops, and the empty quota still caps, in draw order
    strict = make_filter(empty=0.25).select(*split([mismatched(1), empty_pair(2), empty_pair(3), matched(4),
                                                    matched(5), matched(6)]), "nuc", keep=4, order="draw")
    assert strict.kept == [1, 3, 4, 5] and strict.max_empty == 1
    with pytest.raises(ValueError, match="order"):
        filt.select(*split(pairs), "nuc", order="size")


def sel_kept_default(pairs) -> list[int]:
    return make_filter().select(*split(pairs), "nuc").kept


def test_empty_masks_are_kept_only_at_the_real_rate():
    # empty masks over empty-looking images agree perfectly (Dice 1) and would win every ranking
    pairs = [empty_pair(i) for i in range(8)] + [matched(10 + i) for i in range(8)]
    sel = make_filter(empty=0.25).select(*split(pairs), "nuc", keep=8, order="agreement")
    kept_empty = [i for i in sel.kept if sel.scores[i].empty]
    assert len(sel.kept) == 8 and len(kept_empty) == 2 == sel.max_empty
    assert make_filter(empty=0.0).select(*split(pairs), "nuc", keep=8, order="agreement").kept == \
        sorted(range(8, 16), key=lambda i: -make_filter().score([pairs[i][0]], [pairs[i][1]], 0.6)[0].agreement)
    # without keep: every passing regular pair, and empties at the real share of the kept set
    sel = make_filter(empty=0.2).select(*split(pairs), "nuc")
    n_empty = sum(sel.scores[i].empty for i in sel.kept)
    assert len(sel.kept) - n_empty == 8 and n_empty == 2  # 2 / 10 = the real 20 %
    # a stray bright pixel the segmenter marks does not turn an empty tile's agreement into Dice 0
    image, mask = empty_pair(40)
    image[5, 5] = 255
    assert make_filter().score([image], [mask], 0.6)[0].agreement == 1.0
    # an empty mask over an image full of nuclei disagrees and is dropped whatever the quota
    image, _ = matched(30)
    sel = make_filter(empty=1.0).select([image], [np.zeros((SIZE, SIZE), np.uint8)], "nuc")
    assert sel.kept == [] and sel.scores[0].empty and not sel.scores[0].passed


def test_full_masks_are_kept_only_at_the_real_rate():
    pairs = [full_pair(i) for i in range(6)] + [matched(20 + i) for i in range(6)]
    sel = make_filter(full=0.0).select(*split(pairs), "nuc", keep=6)
    assert not any(sel.scores[i].full for i in sel.kept) and len(sel.kept) == 6
    sel = make_filter(full=0.5).select(*split(pairs), "nuc", keep=6)
    assert sum(sel.scores[i].full for i in sel.kept) == 3 and len(sel.kept) == 6
    sel = make_filter(full=0.5).select(*split(pairs), "nuc", keep=6, max_full=1)  # explicit quota wins
    assert sum(sel.scores[i].full for i in sel.kept) == 1


def test_top_up_fills_with_the_best_rest_within_the_empty_cap():
    # a study keeps every group's size: too few passing pairs are topped up with the best of the
    # rest, but capped empty masks (agreement 1 over empty-looking images) only when nothing else is left
    pairs = [empty_pair(0), mismatched(1), empty_pair(2), matched(3), mismatched(4)]
    sel = make_filter(empty=0.0).select(*split(pairs), "nuc", keep=3)
    assert sel.kept == [3] and sel.max_empty == 0 and sel.scores[0].agreement == 1.0
    filled = sel.filled(3)
    assert filled[0] == 3 and sorted(filled[1:]) == [1, 4]  # the mismatched pairs before the empty ones
    assert sel.filled(5)[3:] == [0, 2]  # empties only once nothing else is left
    assert sel.filled(9) == sel.filled(5) and sel.filled(1) == [3]
    sel = make_filter(empty=0.0).select(*split(pairs), "nuc", keep=3, max_empty=1)
    filled = sel.filled(3)
    assert {0, 3} < set(filled) and len(set(filled) & {1, 4}) == 1  # one empty within its cap of 1


def test_the_study_judges_the_candidates_synthesize_draws():
    """The Dice study's filtered row, synthesize and the sampling-defaults ladder draw the same number
    of candidates per kept pair unless told (a study at 2 topped brightfield up with failing pairs
    where synthesize at 3 had enough passing ones)."""
    import inspect

    from pathar_aug import cli, sampling_defaults
    from pathar_aug.filter_order import DEFAULT_OVERSAMPLE
    from pathar_aug.study import BenchmarkSettings

    synthesize_default = inspect.signature(cli.synthesize).parameters["oversample"].default.default
    assert BenchmarkSettings().filter_oversample == synthesize_default == DEFAULT_OVERSAMPLE
    assert sampling_defaults.FILTER_OVERSAMPLE == DEFAULT_OVERSAMPLE


def test_empty_and_full_shares_of_masks():
    masks = [empty_pair(0)[1], full_pair(1)[1], matched(2)[1], matched(3)[1]]
    stray = np.zeros((SIZE, SIZE), np.uint8)
    stray[0, 0] = 1  # a stray pixel counts as empty (EMPTY_MAX_FOREGROUND)
    assert empty_full_shares(masks + [stray]) == (0.4, 0.2)
    assert empty_full_shares([torch.from_numpy(m) for m in masks]) == (0.25, 0.25)
    assert empty_full_shares([]) == (0.0, 0.0)


def test_quotas_of_separate_chunks_add_up_to_the_real_rate():
    for share in (0.0, 0.1, 0.19, 0.5, 0.77, 1.0):
        for n, step in ((100, 32), (7, 3), (400, 4)):
            assert sum(quota(share, a, min(a + step, n)) for a in range(0, n, step)) == int(share * n + 0.5)


def _patchset(pairs, label_names=("nuc",)) -> PatchSet:
    return PatchSet(images=torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous(),
                    masks=torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None].to(torch.uint8),
                    labels=torch.zeros(len(pairs), dtype=torch.long), label_names=list(label_names),
                    sources=[f"s{i}" for i in range(len(pairs))])


def test_threshold_and_shares_come_from_the_real_tiles():
    seg = BrightSegmenter()
    train = _patchset([matched(i) for i in range(6)] + [empty_pair(50), empty_pair(51), full_pair(52)]
                      + [mismatched(60)])
    # held-out tiles with a spread of agreement: some masks shifted by a few pixels
    held = [matched(100 + i) for i in range(6)]
    held += [(img, np.roll(m, s, axis=1)) for s, (img, m) in zip((2, 4, 6, 8), [matched(200 + i) for i in range(4)])]
    held += [empty_pair(300)]  # empty tiles do not enter the agreement distribution
    heldout = _patchset(held)
    out = real_statistics(seg, train, heldout, percentile=10.0)["nuc"]
    assert out.n_train == 10 and out.empty_share == pytest.approx(0.2) and out.full_share == pytest.approx(0.1)
    expected = [QualityFilter(seg, {"nuc": stats()}).score([i], [m], 0.0)[0].agreement for i, m in held[:-1]]
    assert out.agreement_source == "heldout" and out.agreement_n == 10
    assert out.threshold == pytest.approx(np.percentile(expected, 10.0))
    assert out.threshold == pytest.approx(agreement_threshold(expected, 10.0))
    assert min(expected) <= out.threshold < np.median(expected)
    # too few held-out tiles: the training tiles (regular ones only) give the distribution
    small = real_statistics(seg, train, _patchset(held[:3]), percentile=10.0)["nuc"]
    assert small.agreement_source == "train" and small.agreement_n == 7
    assert real_statistics(seg, train, None, 10.0)["nuc"].agreement_source == "train"


# ------------------------------------------------------------------ a real run and nnU-Net dataset
@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> dict[str, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("qf"))


@pytest.fixture
def raw(nnunet_dirs) -> Path:
    return nnunet_dirs["raw"]


def test_train_stores_the_filter_and_it_judges_real_pairs(run):
    folder = run["run"] / FILTER_DIR
    data = json.loads((folder / STATS_FILE).read_text())
    assert (folder / "segmenter.pt").is_file() and set(data["labels"]) == {"bright", "dark"}
    for s in data["labels"].values():
        assert 0.0 <= s["empty_share"] <= 1.0 and 0.0 < s["threshold"] <= s["agreement_quantiles"]["p50"]
    from pathar_aug.evaluation.segmenter import SegmenterConfig
    from pathar_aug.pipeline import load_patches

    quality = QualityFilter.load(run["run"])
    assert quality.segmenter.config.seed != SegmenterConfig().seed  # not the evaluation's segmenter
    assert quality.segmenter.config.width != SegmenterConfig().width
    train, _ = load_patches(run["run"])
    idx = [i for i in range(len(train)) if train.masks[i].float().mean() > 0.05][:6]
    images = [train.images[i] for i in idx]
    own = [train.masks[i] for i in idx]
    other = [torch.rot90(train.masks[i], 1, (-2, -1)).roll(8, -1) for i in idx]
    label = train.label_names[int(train.labels[idx[0]])]
    sel = quality.select(images + images, own + other, label, min_agreement=0.0)
    agree = [s.agreement for s in sel.scores]
    assert np.mean(agree[:6]) > np.mean(agree[6:]) + 0.2  # its own mask agrees, a moved one does not


def test_synthesize_records_scores_and_acceptance(run, raw):
    from nnunet_integration.manifest import load_manifest
    from nnunet_integration.runner import verify

    res = runner.invoke(app, ["import", "--images", str(run["images"]), "--masks", str(run["masks"]),
                              "--into", "Dataset511_Filter"])
    assert res.exit_code == 0, res.output
    dataset = raw / "Dataset511_Filter"
    # threshold 0: every candidate passes, so the count is deterministic; 4 of 8 are kept (as drawn)
    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "511", "--n", "4", "--per-label",
                              "--batch-size", "4", "--oversample", "2", "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "filter bright: kept" in text and "acceptance" in text and "of 4 requested pairs written" in text
    manifest = load_manifest(dataset)
    (settings,) = [b["settings"] for b in manifest.batches.values()]
    assert settings["filter"]["oversample"] == 2.0 and settings["filter"]["min_agreement"] == 0.0
    scores = {name: manifest.scores(name) for name in manifest.names()}
    assert scores and all(s is not None for s in scores.values())
    for s in scores.values():
        assert set(s) == {"agreement", "foreground", "empty", "full", "threshold"} and s["agreement"] >= s["threshold"]
    filt = QualityFilter.load(run["run"])
    for label in ("bright", "dark"):
        mine = [s for n, s in scores.items() if f"_{label}-" in n]
        assert 0 < len(mine) <= 4
        assert sum(s["empty"] for s in mine) <= quota(filt.stats[label].empty_share, 0, 4)
    verify(dataset)
    # the library returns the same numbers
    from pathar_aug.sampler import SamplingConfig
    from pathar_aug.sampling_defaults import resolve_sampling
    from pathar_aug.synthesize import synthesize_into

    same = SamplingConfig(batch_size=4, **resolve_sampling(run["run"]))  # what the command used: the run's defaults
    result = synthesize_into(run["run"], "511", 4, per_label=True, sampling=same,
                             oversample=2, min_agreement=0.0, log=lambda _: None)
    assert result.filter == "on" and result.new == 0 and result.present == len(scores)
    for acc in result.labels.values():
        assert acc.requested == 4 and acc.written == sum(f"_{acc.label}-" in n for n in scores)
    # the default threshold: whatever is written reaches the label's real-derived threshold
    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "511", "--n", "3", "--per-label",
                              "--batch-size", "3", "--seed", "1"])
    assert res.exit_code == 0, res.output
    manifest = load_manifest(dataset)
    for name in manifest.names():
        if name not in scores:
            label = "bright" if "_bright-" in name else "dark"
            assert manifest.scores(name)["threshold"] == pytest.approx(filt.stats[label].threshold, abs=1e-4)
            assert manifest.scores(name)["agreement"] >= manifest.scores(name)["threshold"]
    assert "requested pairs written" in " ".join(res.output.split())
    # --filter-order agreement (the ranking): a batch of its own whose settings name no order, as
    # batches written before the option; the default's batches name theirs, draw; every kept pair passes
    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "511", "--n", "2", "--per-label",
                              "--batch-size", "2", "--seed", "2", "--filter-order", "agreement", "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    manifest = load_manifest(dataset)
    orders = {tag: b["settings"]["filter"].get("order") for tag, b in manifest.batches.items()}
    assert len(orders) == 3 and list(orders.values()).count(None) == 1 and list(orders.values()).count("draw") == 2
    (ranked,) = [tag for tag, order in orders.items() if order is None]
    for label in ("bright", "dark"):  # the ranking keeps the best first
        mine = [manifest.scores(n)["agreement"] for n in manifest.names()
                if n.startswith(f"pathar_{ranked}_") and f"_{label}-" in n]
        assert mine and mine == sorted(mine, reverse=True)
    assert all(s["agreement"] >= s["threshold"] for n in manifest.names() if (s := manifest.scores(n)))


def test_no_filter_writes_every_pair_unscored(run, raw):
    from nnunet_integration.manifest import load_manifest

    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "512", "--n", "3", "--per-label",
                              "--batch-size", "4", "--no-filter"])
    assert res.exit_code == 0, res.output
    assert "acceptance" not in res.output and "filter " not in res.output
    dataset = next(raw.glob("Dataset512_*"))
    manifest = load_manifest(dataset)
    assert len(manifest.names()) == 6 and all(manifest.scores(n) is None for n in manifest.names())
    assert all("filter" not in b["settings"] for b in manifest.batches.values())


def test_bad_oversample_is_a_clear_error(run, raw):
    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "513", "--n", "2",
                              "--oversample", "50"])
    assert res.exit_code == 2 and "--oversample" in res.output
    res = runner.invoke(app, ["synthesize", "--model", str(run["run"]), "--into", "513", "--n", "2",
                              "--filter-order", "size"])
    assert res.exit_code == 2 and "--filter-order" in res.output
    assert not list(raw.iterdir())


def test_a_run_without_filter_gets_it_on_first_use_or_with_resume(run, raw, tmp_path):
    old = tmp_path / "old_run"
    shutil.copytree(run["run"], old)
    shutil.rmtree(old / FILTER_DIR)  # as trained before the filter stage existed
    res = runner.invoke(app, ["synthesize", "--model", str(old), "--into", "514", "--n", "2", "--per-label",
                              "--batch-size", "2", "--min-agreement", "0"])
    assert res.exit_code == 0, res.output
    assert "trained before the filter stage existed" in " ".join(res.output.split())
    assert (old / FILTER_DIR / STATS_FILE).is_file()
    shutil.rmtree(old / FILTER_DIR)
    res = runner.invoke(app, ["train", "--images", str(run["images"]), "--masks", str(run["masks"]),
                              "--preset", "tiny", "--out", str(old), "--quiet", "--resume"])
    assert res.exit_code == 0, res.output
    assert (old / FILTER_DIR / STATS_FILE).is_file() and (old / FILTER_DIR / "segmenter.pt").is_file()
    before = (old / FILTER_DIR / "segmenter.pt").read_bytes()
    res = runner.invoke(app, ["train", "--images", str(run["images"]), "--masks", str(run["masks"]),
                              "--preset", "tiny", "--out", str(old), "--quiet", "--resume"])
    assert res.exit_code == 0, res.output
    assert (old / FILTER_DIR / "segmenter.pt").read_bytes() == before  # a complete stage is skipped


def test_sampling_defaults_pick_the_setting_whose_empty_share_matches_the_real_one():
    import torch

    from pathar_aug.sampling_defaults import CANDIDATES, choose_sampling, empty_share

    masks = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    masks[:1, :, 2:5, 2:5] = 1  # one of four holds a nucleus
    assert empty_share(masks) == 0.75

    def fake(empty_by_label: list[dict[float, float]]):
        """A fake prior: colder sampling empties more masks, as a truncated under-trained prior does."""
        def generate(label_index, n, config):
            out = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
            out[int(round(empty_by_label[label_index][config.temperature] * n)):, :, 3:6, 3:6] = 1
            return torch.zeros(n, 3, 8, 8, dtype=torch.uint8), out
        return generate

    ladder = [c["temperature"] for c in CANDIDATES]
    assert ladder == sorted(ladder) and CANDIDATES[0] == {"guidance": 1.5, "temperature": 0.85, "top_k": 100,
                                                          "top_p": 0.92}  # coolest first: the paper's
    both = dict(zip(ladder, [0.9, 0.5, 0.1] + [0.0] * (len(ladder) - 3)))
    choice = choose_sampling(fake([both, both]), ["a", "b"], {"a": 0.05, "b": 0.15}, samples_per_label=20)
    assert choice.chosen == CANDIDATES[2] and choice.per_label == {"a": CANDIDATES[2], "b": CANDIDATES[2]}
    # each label walks the ladder until its share falls to the real one: a one step further than b
    assert [sorted(m["empty_share"]) for m in choice.measured] == [["a", "b"]] * 3 + [["a"]]
    # a label that matches at once stops at the paper's setting; one label each: the cooler is common
    stuck = dict.fromkeys(ladder, 0.0)
    choice = choose_sampling(fake([stuck, both]), ["a", "b"], {"a": 0.5, "b": 0.1}, samples_per_label=20)
    assert choice.per_label == {"a": CANDIDATES[0], "b": CANDIDATES[2]} and choice.chosen == CANDIDATES[0]
    # a full tie keeps the earlier candidate (the paper's setting first)
    tie = choose_sampling(lambda li, n, c: (torch.zeros(n, 3, 4, 4), torch.zeros(n, 1, 4, 4)), ["a"], {"a": 1.0},
                          samples_per_label=5)
    assert tie.chosen == CANDIDATES[0] and tie.per_label == {"a": CANDIDATES[0]}


def test_sampling_defaults_per_label_judge_settings_by_what_the_filter_keeps():
    import torch

    from pathar_aug.sampling_defaults import CANDIDATES, choose_sampling, empty_share

    ladder = [c["temperature"] for c in CANDIDATES]  # 0.85, 0.95, 1.0, 1.1, 1.2, 1.25, 1.3, 1.4
    # label c (few training images) draws nuclei only when sampled hot; a and b cooler already
    empty_by_label = [dict(zip(ladder, [0.6, 0.1, 0.08, 0.05, 0.0, 0.0, 0.0, 0.0])),
                      dict(zip(ladder, [0.5, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0])),
                      dict(zip(ladder, [1.0, 1.0, 0.9, 0.7, 0.45, 0.35, 0.2, 0.1]))]

    def generate(label_index, n, config):
        out = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
        out[int(round(empty_by_label[label_index][config.temperature] * n)):, :, 3:6, 3:6] = 1
        # the image carries the temperature, so the fake agreements below can read it
        return torch.full((n, 3, 8, 8), int(config.temperature * 100), dtype=torch.uint8), out

    real = {"a": 0.05, "b": 0.1, "c": 0.4}
    choice = choose_sampling(generate, ["a", "b", "c"], real, samples_per_label=20)
    # a: 1.1 hits 0.05; b: 1.0 hits 0.1; c: 1.2 and 1.25 both 0.05 away (the walk stops at 1.25, the
    # first at or below 0.4; 1.3 and 1.4 are never drawn): the cooler
    assert choice.per_label == {"a": CANDIDATES[3], "b": CANDIDATES[2], "c": CANDIDATES[4]}
    assert max(i for i, m in enumerate(choice.measured) if "c" in m["empty_share"]) == 5
    assert choice.chosen == CANDIDATES[2]  # one label each: the coolest is the setting for all

    def filtering(label, images, masks, keep):
        """A fake quality filter: hot images of c's empty masks show nuclei and fail; empty masks kept
        at most at the real rate of ``keep``, as QualityFilter.select keeps them."""
        hot = int(images[0, 0, 0, 0]) / 100 > 1.0
        empty = [bool(empty_share(m[None]) == 1.0) for m in masks]
        passing = [i for i, e in enumerate(empty) if not (e and hot and label == "c")]
        quota = int(real[label] * keep + 0.5)
        kept_empty = [i for i in passing if empty[i]][:quota]
        return (kept_empty + [i for i in passing if not empty[i]])[:keep]

    filtered = choose_sampling(generate, ["a", "b", "c"], real, samples_per_label=60, select=filtering)
    # keep = 20 of 60. a and b: every setting keeps 1 / 2 empty pairs of 20 (their real 0.05 / 0.1): a
    # tie the sampled share breaks as before. c: at 1.0 the filter keeps 8 of its 54 empties (0.4 of
    # 20) and its 6 non-empty pairs (kept share 0.57, gap 0.17); hotter, no empty pair passes (gap
    # 0.4, further than the standard error of two kept shares, 0.15); cooler, it keeps only 8 empty
    # pairs (under half the best count of 20)
    assert filtered.per_label == {"a": CANDIDATES[3], "b": CANDIDATES[2], "c": CANDIDATES[2]}
    record = filtered.measured[2]
    assert record["kept"]["c"] == 14 and record["kept_empty_share"]["c"] == pytest.approx(8 / 14)
    assert filtered.measured[3]["kept_empty_share"]["c"] == 0.0 and filtered.measured[3]["kept"]["c"] == 18
    assert filtered.chosen == CANDIDATES[2]


def test_sampling_defaults_treat_kept_shares_within_their_standard_error_as_a_tie():
    import torch

    from pathar_aug.sampling_defaults import CANDIDATES, choose_sampling

    # the paper's setting empties 21 % of the sampled masks, the next 3 % (real 4.5 %); of 64 kept
    # pairs the filter keeps 3 and 1 empty ones: 0.047 against 0.016, a gap of 0.03 within the
    # standard error of two shares of 64 at 4.5 % (0.037), so the sampled share decides
    sampled = {0.85: 0.21, 0.95: 0.03}
    kept_empty = {0.85: 3, 0.95: 1}

    def generate(label_index, n, config):
        masks = torch.ones(n, 1, 8, 8, dtype=torch.uint8)
        masks[:int(round(sampled[config.temperature] * n))] = 0
        return torch.full((n, 3, 8, 8), int(config.temperature * 100), dtype=torch.uint8), masks

    def select(label, images, masks, keep):
        empty = [i for i in range(len(masks)) if not masks[i].any()]
        full = [i for i in range(len(masks)) if masks[i].any()]
        n_empty = kept_empty[int(images[0, 0, 0, 0]) / 100]
        return empty[:n_empty] + full[:keep - n_empty]

    choice = choose_sampling(generate, ["h"], {"h": 0.045}, samples_per_label=192, select=select)
    assert choice.per_label == {"h": CANDIDATES[1]}
    # 12 against 1 empty of 64 is no tie: the kept share closest to the real one wins
    kept_empty[0.85], kept_empty[0.95] = 3, 12
    choice = choose_sampling(generate, ["h"], {"h": 0.045}, samples_per_label=192, select=select)
    assert choice.per_label == {"h": CANDIDATES[0]}


def test_resolved_sampling_gives_each_label_its_own_setting_and_the_command_line_wins(run, tmp_path):
    import json
    import shutil

    from pathar_aug.sampler import SamplingConfig
    from pathar_aug.sampling_defaults import SAMPLING_FILE, describe_sampling, resolve_sampling

    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run["run"] / "run.json", folder / "run.json")
    names = json.loads((folder / "run.json").read_text())["data"]["label_names"]
    assert len(names) >= 2
    common = {"guidance": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    (folder / SAMPLING_FILE).write_text(json.dumps({"chosen": common, "per_label": {
        names[0]: common, names[1]: {**common, "temperature": 1.2}}}))
    resolved = resolve_sampling(folder)
    assert {k: resolved[k] for k in common} == common
    assert resolved["by_label"] == {1: {"temperature": 1.2}}  # only what differs, by label index
    config = SamplingConfig(**resolved)
    assert config.for_label(1).temperature == 1.2 and config.for_label(0).temperature == 1.0
    assert names[1] + ": temperature 1.2" in describe_sampling(resolved, names)
    # a value given on the command line applies to every label
    forced = resolve_sampling(folder, temperature=0.9)
    assert forced["temperature"] == 0.9 and forced["by_label"] == {}
    # a file chosen before per-label settings existed: one setting for all
    (folder / SAMPLING_FILE).write_text(json.dumps({"chosen": common}))
    assert resolve_sampling(folder)["by_label"] == {}
