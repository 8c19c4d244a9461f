"""``evaluate_sets``: every metric for every (label, named set), written as CSV, markdown and PNG grids.

The result is a long table, one row per (label, set, feature_space, metric), so reference sets
(real held-out, tokenizer reconstructions, a weak baseline) and the model are simply more named
sets. ``feature_space`` says where a number was computed: an extractor's name for FID / KID /
precision / recall / mean_pairwise_l2, the classifier for style_score, the LPIPS variant for
lpips, ``masks`` for structure statistics, ``texture`` for how hard the pairs are to segment
(fine detail, background spread and nucleus contrast, ``texture.py``) and ``segmenter`` for
image-mask Dice (also apart for masks with nuclei and for empty masks: whether an image shows
nuclei where its mask has none).

Multi-class masks (``EvalConfig.mask_classes`` with K > 2 names): the segmenter is K-way, each
foreground class gets its own image-mask Dice row (``image_mask_dice_<class>``) beside the
foreground Dice, and structure statistics count the nuclei of the class maps
(``mask_classes.class_instances``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from nnunet_integration.names import file_part

from ..filter_order import DEFAULT_ORDER
from ..mask_classes import class_instances
from ..preview import save_grid as preview_grid
from ..reporter import Reporter, reporter_for
from .distribution import fid, kid, precision_recall
from .diversity import LPIPS, mean_pairwise_distance
from .features import ColourTextureFeatures, FeatureExtractor, StyleClassifierFeatures, extract_cached
from .images import Pair, as_mask, as_uint8_rgb, hash_arrays
from .segmenter import Segmenter, SegmenterConfig
from .sets import SWAP
from .structure_stats import compare_mask_stats, mask_stats
from .style_classifier import StyleClassifier, StyleClassifierConfig
from .texture import texture_figures

log = logging.getLogger(__name__)

REAL = "real"
MEAN_LABEL = "(mean)"
COLUMNS = ["label", "set", "feature_space", "metric", "value", "n_real", "n_gen", "ideal"]

# what a perfect generator scores; "≈ real" means: the real set's own row in the same table
IDEAL = {
    "fid": "0", "kid": "0", "kid_std": "-", "precision": "1", "recall": "1",
    "mean_pairwise_l2": "≈ real", "lpips": "≈ real",
    "style_score": "1 (ceiling: classifier validation accuracy)",
    "nuclei_per_patch_w1": "0", "area_w1_px": "0", "eccentricity_w1": "0", "foreground_fraction_w1": "0",
    "empty_share_gap": "0", "full_share_gap": "0",
    "nuclei_per_patch_mean": "≈ real", "area_mean_px": "≈ real", "eccentricity_mean": "≈ real",
    "foreground_fraction_mean": "≈ real", "empty_share": "≈ real", "full_share": "≈ real",
    "fine_detail": "≈ real", "background_std": "≈ real", "nucleus_contrast": "≈ real",
    "image_mask_dice": "1 (ceiling: real held-out)",
    "swap_consistency": "≈ the real tiles' image_mask_dice",
}


@dataclass(frozen=True)
class EvalConfig:
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    diversity_max_samples: int = 2000
    lpips_max_images: int = 64
    lpips_image_size: int | None = 256
    min_area: int = 1  # components below this many pixels are not counted as nuclei
    full_threshold: float = 0.98  # foreground share at which a mask counts as "full"
    train_style_classifier: bool = True
    train_segmenter: bool = True
    style: StyleClassifierConfig = field(default_factory=StyleClassifierConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    grid_samples: int = 8
    grid_cell: int = 96
    device: str = "auto"
    progress: bool = True
    seed: int = 0
    # the filtered model set keeps pairs reaching this agreement (None: the run filter's own threshold)
    filter_min_agreement: float | None = None
    filter_order: str = DEFAULT_ORDER  # filter_order.ORDERS
    # a multi-class run's class names (K > 2; empty: binary) and mask mode ("classes" or "border")
    mask_classes: tuple[str, ...] = ()
    mask_mode: str = "classes"

    @property
    def classes(self) -> int:
        """Mask classes the segmenter separates: 2 (binary) or K."""
        return max(2, len(self.mask_classes))


def ideal_of(metric: str) -> str:
    if metric.startswith("image_mask_dice_"):  # one per foreground class
        return IDEAL["image_mask_dice"]
    return IDEAL.get(metric, "")


def default_extractors(style_classifier: StyleClassifier | None) -> list[FeatureExtractor]:
    """Weight-free defaults: the style classifier's space (if any) and the colour/texture fallback."""
    out: list[FeatureExtractor] = []
    if style_classifier is not None:
        out.append(StyleClassifierFeatures(style_classifier))
    out.append(ColourTextureFeatures())
    return out


def normalise(pairs: Sequence[Pair]) -> list[Pair]:
    return [(as_uint8_rgb(img), as_mask(mask)) for img, mask in pairs]


def _model_key(arrays: list[np.ndarray], cfg: object, extra: str) -> str:
    return hash_arrays(arrays, extra=json.dumps(dataclasses.asdict(cfg), sort_keys=True) + extra)


def cached_style_classifier(
    real: Mapping[str, list[Pair]], cfg: EvalConfig, cache_dir: Path | None, reporter: Reporter | None = None
) -> StyleClassifier:
    """The style classifier trained on ``real`` (loaded from ``cache_dir`` when trained before)."""
    labels = sorted(real)
    arrays = [img for label in labels for img, _ in real[label]]
    path = None
    if cache_dir is not None:
        key = _model_key(arrays, cfg.style, "|".join(f"{lb}:{len(real[lb])}" for lb in labels))
        path = cache_dir / f"style_classifier-{key}.pt"
        if path.is_file():
            return StyleClassifier.load(path, cfg.device)
    clf = StyleClassifier.fit(
        {lb: [img for img, _ in real[lb]] for lb in labels}, cfg.style, cfg.device,
        reporter=reporter_for(reporter, progress=cfg.progress),
    )
    if path is not None:
        clf.save(path)
    return clf


def dice_apart(dices: np.ndarray, pairs: Sequence[Pair]) -> dict[str, tuple[float, int]]:
    """Per-pair image-mask Dice averaged apart over masks with nuclei and over empty masks (there
    the Dice is 1 only where the segmenter finds nothing in the image): part -> (mean, pairs)."""
    empty = np.array([not np.any(np.asarray(m) > 0) for _, m in pairs])
    return {part: (float(np.mean(dices[rows])), int(rows.sum()))
            for part, rows in (("on_masks_with_nuclei", ~empty), ("on_empty_masks", empty)) if rows.any()}


def _cached_segmenter(real: Mapping[str, list[Pair]], cfg: EvalConfig, cache_dir: Path | None,
                      reporter: Reporter | None) -> Segmenter:
    pairs = [p for label in sorted(real) for p in real[label]]
    path = None
    if cache_dir is not None:
        key = _model_key([a for p in pairs for a in p], cfg.segmenter,
                         "" if cfg.classes == 2 else "classes:" + ",".join(cfg.mask_classes))
        path = cache_dir / f"segmenter-{key}.pt"
        if path.is_file():
            return Segmenter.load(path, cfg.device)
    seg = Segmenter.fit(pairs, cfg.segmenter, cfg.device, reporter=reporter_for(reporter, progress=cfg.progress),
                        classes=cfg.classes)
    if path is not None:
        seg.save(path)
    return seg


def evaluate_sets(
    real: Mapping[str, Sequence[Pair]],
    generated: Mapping[str, Mapping[str, Sequence[Pair]]],
    extractors: Sequence[FeatureExtractor] | None = None,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    *,
    config: EvalConfig | None = None,
    style_classifier: StyleClassifier | None = None,
    segmenter: Segmenter | None = None,
    lpips: LPIPS | None = None,
    reporter: Reporter | None = None,
) -> pd.DataFrame:
    """Compare named generated sets with the real set, per label.

    real: label -> [(image uint8 HxWx3, mask HxW {0,1} or instance ids)].
    generated: set name -> label -> pairs (any number of sets; labels missing from a set are skipped).
    extractors: feature spaces for FID / KID / precision-recall / feature diversity; None gives
        ``default_extractors`` (style-classifier features and the colour/texture fallback).
    style_classifier / segmenter: pre-trained models; otherwise trained on ``real`` (cached in
        ``cache_dir``) unless switched off in ``config``.
    lpips: an ``LPIPS`` built from local weights; without it no "lpips" rows are produced.
    reporter: where progress goes (none when ``config.progress`` is off).
    Returns the long metrics table (see module doc); writes metrics.csv, metrics.md,
    metadata.json and grid_<label>.png into ``out_dir`` when given.
    """
    cfg = config or EvalConfig()
    reporter = reporter_for(reporter, progress=cfg.progress)
    if REAL in generated:
        raise ValueError(f"set name {REAL!r} is reserved for the real reference set")
    real_n = {label: normalise(pairs) for label, pairs in real.items() if len(pairs)}
    gen_n = {name: {label: normalise(pairs) for label, pairs in sets.items() if len(pairs)} for name, sets in generated.items()}
    unknown = sorted({lb for sets in gen_n.values() for lb in sets} - set(real_n))
    if unknown:
        raise ValueError(f"generated labels without real images: {unknown}")
    cache = Path(cache_dir) if cache_dir is not None else None
    feat_cache = cache / "features" if cache is not None else None

    if style_classifier is None and cfg.train_style_classifier:
        if len(real_n) >= 2:
            style_classifier = cached_style_classifier(real_n, cfg, cache, reporter)
        else:
            log.warning("one label only: no style classifier, no style_score")
    if segmenter is None and cfg.train_segmenter:
        segmenter = _cached_segmenter(real_n, cfg, cache, reporter)
    extractors = list(extractors) if extractors is not None else default_extractors(style_classifier)
    names = [e.name for e in extractors]
    if len(set(names)) != len(names):
        raise ValueError(f"feature extractor names must be unique, got {names}")

    rows: list[dict] = []

    def add(label: str, set_name: str, space: str, metric: str, value: float, n_real: int, n_gen: int) -> None:
        rows.append(dict(label=label, set=set_name, feature_space=space, metric=metric, value=float(value),
                         n_real=n_real, n_gen=n_gen, ideal="reference" if set_name == REAL else ideal_of(metric)))

    def add_texture(label: str, set_name: str, pairs: Sequence[Pair], n_real: int) -> None:
        t = texture_figures(pairs)
        add(label, set_name, "texture", "fine_detail", t.fine_detail, n_real, t.tiles)
        add(label, set_name, "texture", "background_std", t.background_std, n_real, t.tiles)
        if t.contrast_tiles:
            add(label, set_name, "texture", "nucleus_contrast", t.contrast, n_real, t.contrast_tiles)

    def stats_masks(pairs: Sequence[Pair]) -> list[np.ndarray]:
        """Masks as structure statistics count nuclei: class maps of a multi-class run as instances."""
        if cfg.classes == 2:
            return [p[1] for p in pairs]
        return [class_instances(p[1], cfg.mask_mode) for p in pairs]

    n_jobs = sum(1 + sum(label in sets for sets in gen_n.values()) for label in real_n)
    with reporter.task("evaluate", total=n_jobs) as task:
        for label in sorted(real_n):
            r_pairs = real_n[label]
            r_imgs = [p[0] for p in r_pairs]
            nr = len(r_pairs)
            task.update(info=f"{label} / {REAL}")
            r_feats = {e.name: extract_cached(e, r_imgs, feat_cache) for e in extractors}
            r_stats = mask_stats(stats_masks(r_pairs), cfg.min_area, cfg.full_threshold)
            # the real set's own descriptive values: the reference for every "≈ real" metric
            for e in extractors:
                add(label, REAL, e.name, "mean_pairwise_l2",
                    mean_pairwise_distance(r_feats[e.name], cfg.diversity_max_samples, cfg.seed), nr, nr)
            if lpips is not None:
                value, _ = lpips.mean_pairwise(r_imgs, cfg.lpips_max_images, cfg.lpips_image_size, seed=cfg.seed)
                add(label, REAL, lpips.name, "lpips", value, nr, nr)
            for metric, value in r_stats.summary().items():
                add(label, REAL, "masks", metric, value, nr, nr)
            add_texture(label, REAL, r_pairs, nr)
            task.advance(1)

            for set_name, sets in gen_n.items():
                if label not in sets:
                    continue
                task.update(info=f"{label} / {set_name}")
                g_pairs = sets[label]
                g_imgs = [p[0] for p in g_pairs]
                ng = len(g_pairs)
                for e in extractors:
                    gf, rf = extract_cached(e, g_imgs, feat_cache), r_feats[e.name]
                    if nr >= 2 and ng >= 2:
                        add(label, set_name, e.name, "fid", fid(rf, gf), nr, ng)
                        k = kid(rf, gf, cfg.kid_subsets, cfg.kid_subset_size, seed=cfg.seed)
                        add(label, set_name, e.name, "kid", k.mean, nr, ng)
                        add(label, set_name, e.name, "kid_std", k.std, nr, ng)
                        pr = precision_recall(rf, gf, cfg.pr_k)
                        add(label, set_name, e.name, "precision", pr.precision, nr, ng)
                        add(label, set_name, e.name, "recall", pr.recall, nr, ng)
                    add(label, set_name, e.name, "mean_pairwise_l2",
                        mean_pairwise_distance(gf, cfg.diversity_max_samples, cfg.seed), nr, ng)
                if style_classifier is not None:
                    add(label, set_name, "style-classifier", "style_score",
                        style_classifier.style_score(g_imgs, label), nr, ng)
                if lpips is not None:
                    value, _ = lpips.mean_pairwise(g_imgs, cfg.lpips_max_images, cfg.lpips_image_size, seed=cfg.seed)
                    add(label, set_name, lpips.name, "lpips", value, nr, ng)
                g_stats = mask_stats(stats_masks(g_pairs), cfg.min_area, cfg.full_threshold)
                for metric, value in {**compare_mask_stats(r_stats, g_stats), **g_stats.summary()}.items():
                    add(label, set_name, "masks", metric, value, nr, ng)
                add_texture(label, set_name, g_pairs, nr)
                if segmenter is not None:
                    dices = segmenter.dice_against(g_pairs)
                    dice = float(np.mean(dices))
                    add(label, set_name, "segmenter", "image_mask_dice", dice, nr, ng)
                    for part, (value, count) in dice_apart(dices, g_pairs).items():
                        add(label, set_name, "segmenter", f"image_mask_dice_{part}", value, nr, count)
                    if segmenter.classes > 2:
                        per_class = segmenter.class_dice_against(g_pairs).mean(axis=0)
                        for name, value in zip(cfg.mask_classes[1:], per_class):
                            add(label, set_name, "segmenter", f"image_mask_dice_{name}", value, nr, ng)
                    if set_name == SWAP:  # on swapped tokens: do the images follow their structure?
                        add(label, set_name, "segmenter", "swap_consistency", dice, nr, ng)
                task.advance(1)

    df = pd.DataFrame(rows, columns=COLUMNS)
    df = pd.concat([df, _label_means(df, len(real_n))], ignore_index=True)

    meta = {
        "labels": sorted(real_n),
        "sets": [REAL, *gen_n],
        "n_real": {lb: len(p) for lb, p in real_n.items()},
        "n_generated": {s: {lb: len(p) for lb, p in sets.items()} for s, sets in gen_n.items()},
        "feature_spaces": {e.name: e.fingerprint for e in extractors},
        "style_classifier_val_accuracy": style_classifier.val_accuracy if style_classifier else None,
        "segmenter_val_dice": segmenter.val_dice if segmenter else None,
        "lpips": lpips.name if lpips is not None else None,
        "config": dataclasses.asdict(cfg),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "metrics.csv", index=False)
        (out / "metrics.md").write_text(to_markdown(df, meta))
        (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
        for label in sorted(real_n):
            rows_grid = [(REAL, real_n[label])] + [(s, sets[label]) for s, sets in gen_n.items() if label in sets]
            save_grid(rows_grid, out / f"grid_{grid_name(label)}.png", cfg.grid_samples, cfg.grid_cell)
    df.attrs["metadata"] = meta
    return df


def _label_means(df: pd.DataFrame, n_labels: int) -> pd.DataFrame:
    """Average over labels, for sets that cover every label (the paper's "Avg." columns)."""
    if n_labels < 2 or df.empty:
        return pd.DataFrame(columns=COLUMNS)
    g = df.groupby(["set", "feature_space", "metric"], sort=False)
    agg = g.agg(value=("value", "mean"), n_real=("n_real", "sum"), n_gen=("n_gen", "sum"),
                ideal=("ideal", "first"), labels=("label", "nunique")).reset_index()
    agg = agg[agg["labels"] == n_labels].drop(columns="labels")
    agg.insert(0, "label", MEAN_LABEL)
    return agg[COLUMNS]


def _fmt(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def md_table(header: list[str], body: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def to_markdown(df: pd.DataFrame, meta: Mapping | None = None) -> str:
    """One table per feature space: rows (label, set), columns metrics, N stated on every row."""
    parts = ["# Generation quality", ""]
    if meta:
        acc, dice_v = meta.get("style_classifier_val_accuracy"), meta.get("segmenter_val_dice")
        parts.append(f"Style classifier validation accuracy on held-out real patches: {_fmt(acc) if acc is not None else 'n/a'}. "
                     f"Segmenter validation Dice on held-out real pairs: {_fmt(dice_v) if dice_v is not None else 'n/a'}.")
        parts.append("")
    parts.append("Ideal values: FID, KID, W1 and gaps 0; precision, recall, style score, Dice 1; "
                 "diversity and descriptive values as close as possible to the `real` row. "
                 "FID is biased upwards when N is below the feature dimension; KID is printed as is "
                 "(the paper prints it x10^3). Each table is one feature space; never compare numbers "
                 "across feature spaces.")
    for space in df["feature_space"].drop_duplicates():
        sub = df[df["feature_space"] == space]
        order = {m: i for i, m in enumerate(IDEAL)}
        metrics = sorted(sub["metric"].drop_duplicates(), key=lambda m: order.get(m, len(order)))
        wide = sub.pivot_table(index=["label", "set"], columns="metric", values="value", sort=False, dropna=False)
        ns = sub.groupby(["label", "set"], sort=False)[["n_real", "n_gen"]].first()
        parts += ["", f"## Feature space: `{space}`", ""]
        header = ["label", "set", "N real", "N gen", *metrics]
        body = []
        for (label, set_name), row in wide.iterrows():
            if (label, set_name) not in ns.index:  # a set empty for this label (no pair passed the filter)
                continue
            n = ns.loc[(label, set_name)]
            body.append([label, set_name, int(n["n_real"]), int(n["n_gen"]),
                         *[row.get(m, float("nan")) for m in metrics]])
        parts.append(md_table(header, body))
    return "\n".join(parts) + "\n"


def grid_name(label: str) -> str:
    """The file name part of a label's sample grid: ``grid_<grid_name(label)>.png``."""
    return file_part(label, fallback="label")


def _cell(image: np.ndarray, mask: np.ndarray, size: int) -> Image.Image:
    """Image with the mask outline drawn in yellow, so image-mask agreement is visible at a glance."""
    img = as_uint8_rgb(image).copy()
    fg = as_mask(mask) > 0
    if fg.shape == img.shape[:2]:
        edge = fg & ~ndimage.binary_erosion(fg, iterations=max(1, img.shape[0] // 128))
        img[edge] = (255, 230, 0)
    return Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)


def save_grid(rows: Sequence[tuple[str, Sequence[Pair]]], path: str | Path, n: int = 8, cell: int = 96) -> None:
    """PNG grid: one row per named set, its first ``n`` samples with mask outlines."""
    tiles = [[np.asarray(_cell(img, mask, cell)) for img, mask in list(pairs)[:n]] for _, pairs in rows]
    preview_grid(tiles, path, names=[name for name, _ in rows])
