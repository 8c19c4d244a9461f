"""Quality filter for generated pairs: image-mask agreement and mask statistics.

A generated pair is only useful to a segmentation network when its mask outlines the nuclei its
image shows, and when masks with nothing (or nothing but) foreground are no more frequent than in
real data. Two scores per pair say so:

- ``agreement``: Dice between the mask generated with the image and the mask a small segmenter,
  trained on the run's real training patches, predicts for that image;
- ``foreground``: the mask's foreground share, from which ``empty`` and ``full`` follow.

Multi-class masks (K > 2 classes): the segmenter is K-way; the agreement stays the Dice of
foreground (any class but background) against foreground, and each pair's scores also record
the Dice of every foreground class (``class_agreement``), which selects nothing.

The filter is a stage at the end of ``pathar-aug train`` and lives in the run folder::

    RUN/filter/segmenter.pt    the filter's segmenter
    RUN/filter/filter.json     per label: real empty/full shares, the real agreement distribution,
                               the default threshold; written last, it marks the stage complete

Independence from ``pathar-aug evaluate``: that command's image-mask Dice comes from its own
segmenter (``evaluation.segmenter.SegmenterConfig`` defaults: width 12, seed 0, trained on real
held-out patches). The filter reuses the same network and training loop but is trained separately,
on the run's training patches, with another width and seed, so the evaluation does not merely
measure the filter's own judgement again.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch

from pathar_aug.config import save_json
from pathar_aug.evaluation.segmenter import Segmenter, SegmenterConfig
from pathar_aug.filter_order import DEFAULT_ORDER, check_order
from pathar_aug.mask_classes import MaskClasses
from pathar_aug.metrics import binary_dice, class_dices
from pathar_aug.patches import PatchSet
from pathar_aug.pipeline import RunError
from pathar_aug.reporter import Reporter

FILTER_DIR = "filter"
SEGMENTER_FILE = "segmenter.pt"
STATS_FILE = "filter.json"
FORMAT = "pathar-aug quality filter"

# A mask is "empty" below this foreground share and "full" above the other: a handful of stray
# decoded pixels teaches a segmenter the same as an empty tile (at 128 px: fewer than 33 pixels).
EMPTY_MAX_FOREGROUND = 0.002
FULL_MIN_FOREGROUND = 0.998

# Fewer held-out tiles than this (per label) make a percentile meaningless: use training tiles.
MIN_HELDOUT_TILES = 8


class FilterUnavailable(RunError):
    """The run folder has no complete quality filter (trained before the filter stage existed)."""


@dataclass(frozen=True)
class FilterConfig:
    steps: int = 300
    # width 16 (the evaluation's segmenter: 12) and its own seed: another network, not a copy
    width: int = 16
    crop: int = 64
    batch_size: int = 8
    lr: float = 3e-3
    seed_offset: int = 7919  # added to the run's seed
    # The default threshold is this percentile of the filter segmenter's Dice on real tiles of the
    # label it never trained on (the run's held-out source images; training tiles only when a label
    # has too few held-out ones). Generated images are unseen too, so held-out tiles are the fair
    # yardstick; training tiles would overstate real agreement and reject good pairs. The 10th
    # percentile keeps a generated pair that agrees at least as well as 90 % of real pairs do.
    percentile: float = 10.0


FILTER_PRESETS: dict[str, FilterConfig] = {
    "tiny": FilterConfig(steps=30, width=8, crop=32),
    # about a minute on two cores at 128 px patches
    "cpu": FilterConfig(steps=300),
    "paper": FilterConfig(steps=1500, width=24, crop=128),
}


@dataclass
class LabelStats:
    """What the real data of one label says: mask statistics and the agreement threshold."""

    n_train: int
    empty_share: float  # share of the real training patches with an empty mask
    full_share: float  # likewise full
    threshold: float  # default minimum agreement of a generated pair
    agreement_source: str  # "heldout" or "train": the real tiles the threshold was measured on
    agreement_n: int
    agreement_mean: float
    agreement_quantiles: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairScores:
    agreement: float
    foreground: float
    empty: bool
    full: bool
    passed: bool  # agreement >= the threshold in force
    class_agreement: dict[str, float] | None = None  # K > 2 classes: Dice per foreground class

    def to_json(self, threshold: float) -> dict[str, Any]:
        out = {"agreement": round(self.agreement, 4), "foreground": round(self.foreground, 4),
               "empty": self.empty, "full": self.full, "threshold": round(threshold, 4)}
        if self.class_agreement is not None:
            out["class_agreement"] = {name: round(v, 4) for name, v in self.class_agreement.items()}
        return out


@dataclass
class Selection:
    """The outcome of ``QualityFilter.select`` for one label's candidates."""

    kept: list[int]  # candidate indices, in the order of selection (as drawn, or best agreement first)
    scores: list[PairScores]  # one per candidate
    threshold: float
    max_empty: int
    max_full: int

    @property
    def candidates(self) -> int:
        return len(self.scores)

    @property
    def passed(self) -> int:
        return sum(s.passed for s in self.scores)

    @property
    def acceptance(self) -> float:
        """Kept candidates / all candidates."""
        return len(self.kept) / self.candidates if self.scores else 0.0

    def filled(self, n: int) -> list[int]:
        """Exactly ``n`` candidates (fewer only when there are fewer): the kept ones, topped up with
        the best agreement of the rest. The top-up respects the empty and full caps while other
        candidates remain: empty masks agree perfectly with empty-looking images and would else
        be the first to fill a gap (a study keeps every group's size; synthesize writes fewer)."""
        picked = list(self.kept[:n])
        n_empty = sum(self.scores[i].empty for i in picked)
        n_full = sum(self.scores[i].full for i in picked)
        taken = set(picked)
        over_cap = []
        for i in sorted((i for i in range(len(self.scores)) if i not in taken),
                        key=lambda i: (-self.scores[i].agreement, i)):
            if len(picked) >= n:
                break
            s = self.scores[i]
            if (s.empty and n_empty >= self.max_empty) or (s.full and n_full >= self.max_full):
                over_cap.append(i)
                continue
            picked.append(i)
            n_empty, n_full = n_empty + s.empty, n_full + s.full
        return picked + over_cap[:n - len(picked)]


class Predictor(Protocol):
    def predict(self, images: Sequence[np.ndarray], threshold: float = 0.5) -> list[np.ndarray]: ...


def foreground_share(mask: np.ndarray) -> float:
    m = np.asarray(mask)
    return float((m > 0).mean()) if m.size else 0.0


def is_empty(share: float) -> bool:
    return share < EMPTY_MAX_FOREGROUND


def is_full(share: float) -> bool:
    return share > FULL_MIN_FOREGROUND


def agreement(pred: np.ndarray, mask: np.ndarray) -> float:
    """Dice of prediction and mask; an empty (or full) mask that the segmenter also sees as empty
    (full), by the same foreground-share rule, agrees fully: a few stray predicted pixels on an
    empty tile would otherwise make its Dice 0."""
    ps, ms = foreground_share(pred), foreground_share(mask)
    if (is_empty(ms) and is_empty(ps)) or (is_full(ms) and is_full(ps)):
        return 1.0
    return binary_dice(pred, mask)


def agreement_threshold(dices: Sequence[float], percentile: float) -> float:
    """The ``percentile``-th percentile of real agreement values (0 when there are none)."""
    values = np.asarray(list(dices), dtype=np.float64)
    return float(np.percentile(values, percentile)) if values.size else 0.0


def quota(share: float, start: int, stop: int) -> int:
    """Empty (or full) masks allowed among pairs start..stop-1 of a label's sequence.

    Differences of rounded cumulative quotas, so that chunks written separately (and resumed
    separately) add up to round(share * n) over the whole sequence, not one rounding per chunk.
    """
    def cum(k: int) -> int:
        return int(math.floor(share * k + 0.5))

    return cum(stop) - cum(start)


def _as_hw3(image: np.ndarray | torch.Tensor) -> np.ndarray:
    a = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # C x H x W, as the generator returns them
    return a


def _as_hw(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    a = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else a


class QualityFilter:
    """Scores generated pairs and keeps those that pass per label within the real data's empty/full rates.

    ``QualityFilter.load(run_dir)`` reads a run's filter; ``select(images, masks, label, keep)``
    returns the kept candidate indices and every candidate's scores.
    """

    def __init__(self, segmenter: Predictor, stats: Mapping[str, LabelStats], config: FilterConfig | None = None,
                 fingerprint: str = "", class_names: Sequence[str] | None = None):
        self.segmenter = segmenter
        self.stats = dict(stats)
        self.config = config or FilterConfig()
        self.fingerprint = fingerprint
        # K > 2 mask classes: the segmenter predicts class maps, scored per class too
        self.class_names = list(class_names) if class_names is not None and len(class_names) > 2 else None

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device = "cpu") -> "QualityFilter":
        folder = Path(run_dir) / FILTER_DIR
        if not filter_complete(run_dir):
            raise FilterUnavailable(
                f"{run_dir} has no quality filter ({folder / STATS_FILE} missing): the run was trained before "
                f"the filter stage existed; add it with `pathar-aug train --out {run_dir} --resume`")
        data = json.loads((folder / STATS_FILE).read_text())
        segmenter = Segmenter.load(folder / SEGMENTER_FILE, str(device))
        stats = {name: LabelStats(**s) for name, s in data["labels"].items()}
        return cls(segmenter, stats, FilterConfig(**data["config"]), data.get("fingerprint", ""), data.get("classes"))

    def thresholds(self) -> dict[str, float]:
        return {name: s.threshold for name, s in self.stats.items()}

    def _label_stats(self, label: str) -> LabelStats:
        if label not in self.stats:
            raise ValueError(f"the quality filter knows no label '{label}'; it knows: {', '.join(self.stats)}")
        return self.stats[label]

    def score(self, images: Sequence[np.ndarray | torch.Tensor], masks: Sequence[np.ndarray | torch.Tensor],
              threshold: float) -> list[PairScores]:
        """Scores of each pair (images H x W x 3 or 3 x H x W uint8, masks H x W or 1 x H x W)."""
        images = [_as_hw3(i) for i in images]
        masks = [_as_hw(m) for m in masks]
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        if not images:
            return []
        predicted = self.segmenter.predict(images)
        out = []
        for pred, mask in zip(predicted, masks):
            share, value = foreground_share(mask), agreement(pred, mask)
            per_class = None
            if self.class_names is not None:
                per_class = dict(zip(self.class_names[1:], class_dices(pred, mask, len(self.class_names))))
            out.append(PairScores(value, share, is_empty(share), is_full(share), value >= threshold, per_class))
        return out

    def select(self, images: Sequence[np.ndarray | torch.Tensor], masks: Sequence[np.ndarray | torch.Tensor],
               label: str, keep: int | None = None, max_empty: int | None = None, max_full: int | None = None,
               min_agreement: float | None = None, order: str = DEFAULT_ORDER) -> Selection:
        """Keep up to ``keep`` passing candidates of one label, in the order given (``order="draw"``,
        the default) or best agreement first (``order="agreement"``; see ``filter_order``).

        A candidate is eligible when its agreement reaches ``min_agreement`` (default: the label's
        threshold from the real distribution). At most ``max_empty`` empty and ``max_full`` full
        masks are kept (default: the real shares of ``keep``). Without ``keep``, every eligible
        candidate is kept, with empty and full masks capped so that their share among the kept
        pairs stays at the real rate.
        """
        check_order(order)
        stats = self._label_stats(label)
        threshold = stats.threshold if min_agreement is None else float(min_agreement)
        scores = self.score(images, masks, threshold)
        regular = sum(s.passed and not (s.empty or s.full) for s in scores)
        if keep is None:
            # total kept T with regular = T * (1 - empty_share - full_share)
            rest = 1.0 - stats.empty_share - stats.full_share
            total = regular / rest if rest > 0 else len(scores)
            default_empty, default_full = (int(math.floor(share * total + 0.5))
                                           for share in (stats.empty_share, stats.full_share))
            keep = len(scores)
        else:
            default_empty, default_full = quota(stats.empty_share, 0, keep), quota(stats.full_share, 0, keep)
        max_empty = default_empty if max_empty is None else max_empty
        max_full = default_full if max_full is None else max_full
        eligible = [i for i, s in enumerate(scores) if s.passed]
        if order == "agreement":
            eligible.sort(key=lambda i: (-scores[i].agreement, i))
        kept: list[int] = []
        n_empty = n_full = 0
        for i in eligible:
            if len(kept) >= keep:
                break
            s = scores[i]
            if s.empty:
                if n_empty >= max_empty:
                    continue
                n_empty += 1
            elif s.full:
                if n_full >= max_full:
                    continue
                n_full += 1
            kept.append(i)
        return Selection(kept, scores, threshold, max_empty, max_full)


# ----------------------------------------------------------------------------------- training
def filter_complete(run_dir: str | Path) -> bool:
    folder = Path(run_dir) / FILTER_DIR
    return (folder / STATS_FILE).is_file() and (folder / SEGMENTER_FILE).is_file()


def _pairs(patches: PatchSet, index: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(patches.images[i].permute(1, 2, 0).numpy(), patches.masks[i, 0].numpy()) for i in index]


def _label_index(patches: PatchSet | None, label: int) -> list[int]:
    return [] if patches is None else (patches.labels == label).nonzero().flatten().tolist()


def empty_full_shares(masks: Sequence[np.ndarray | torch.Tensor]) -> tuple[float, float]:
    """Shares of empty and of full masks among ``masks`` (0, 0 for none)."""
    shares = [foreground_share(np.asarray(m)) for m in masks]
    n = max(len(shares), 1)
    return sum(map(is_empty, shares)) / n, sum(map(is_full, shares)) / n


def real_statistics(segmenter: Predictor, train: PatchSet, heldout: PatchSet | None,
                    percentile: float) -> dict[str, LabelStats]:
    """Per label: empty / full shares of the real training masks, and the agreement threshold.

    The agreement distribution is measured on tiles with some but not all foreground: empty and
    full masks are governed by their quotas, and their Dice (1 or 0 on a pixel) says little.
    """
    out: dict[str, LabelStats] = {}
    for li, name in enumerate(train.label_names):
        train_idx = _label_index(train, li)
        empty_share, full_share = empty_full_shares([train.masks[i, 0].numpy() for i in train_idx])
        held_idx = _label_index(heldout, li)
        source, patches, idx = "heldout", heldout, held_idx
        regular = [i for i in held_idx if not _trivial(heldout.masks[i, 0].numpy())] if heldout is not None else []
        if len(regular) < MIN_HELDOUT_TILES:
            source, patches = "train", train
            regular = [i for i in train_idx if not _trivial(train.masks[i, 0].numpy())]
            idx = train_idx
        chosen = regular or idx  # a label whose masks are all empty or full: judge on all of them
        values: list[float] = []
        if chosen:
            pairs = _pairs(patches, chosen)
            preds = segmenter.predict([p[0] for p in pairs])
            values = [agreement(pr, m) for pr, (_, m) in zip(preds, pairs)]
        out[name] = LabelStats(
            n_train=len(train_idx), empty_share=empty_share, full_share=full_share,
            threshold=agreement_threshold(values, percentile),
            agreement_source=source, agreement_n=len(values),
            agreement_mean=float(np.mean(values)) if values else 0.0,
            agreement_quantiles={f"p{q:g}": float(np.percentile(values, q)) if values else 0.0
                                 for q in (5, 10, 25, 50, 75)},
        )
    return out


def _trivial(mask: np.ndarray) -> bool:
    share = foreground_share(mask)
    return is_empty(share) or is_full(share)


def train_filter(run_dir: str | Path, train: PatchSet, heldout: PatchSet | None, config: FilterConfig,
                 seed: int, device: str | torch.device = "cpu", reporter: Reporter | None = None,
                 classes: MaskClasses | None = None) -> Path:
    """Train the filter's segmenter on the real training patches and store it with the real
    statistics in ``run_dir/filter``; a complete filter is kept as it is. Returns the folder.
    ``classes``: the run's mask classes (K > 2: a K-way segmenter; default binary)."""
    folder = Path(run_dir) / FILTER_DIR
    if filter_complete(run_dir):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    patch = int(train.images.shape[-1])
    seg_config = SegmenterConfig(image_size=patch, crop=min(config.crop, patch), width=config.width,
                                 steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                                 val_fraction=0.0,  # the held-out source images measure it instead
                                 seed=seed + config.seed_offset)
    k = classes.k if classes is not None else 2
    segmenter = Segmenter.fit(_pairs(train, range(len(train))), seg_config, str(device), reporter=reporter, classes=k)
    stats = real_statistics(segmenter, train, heldout, config.percentile)
    segmenter.save(folder / SEGMENTER_FILE)
    save_json({"format": FORMAT, "config": dataclasses.asdict(config), "fingerprint": segmenter.fingerprint,
               "empty_max_foreground": EMPTY_MAX_FOREGROUND, "full_min_foreground": FULL_MIN_FOREGROUND,
               "labels": {name: dataclasses.asdict(s) for name, s in stats.items()},
               **({"classes": list(classes.names)} if k > 2 else {})},
              folder / STATS_FILE)  # last: marks the stage complete
    return folder
