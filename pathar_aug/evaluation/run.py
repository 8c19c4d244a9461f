"""`pathar-aug evaluate`: judge a trained run (or pairs already written) against real patches.

One ``evaluate_sets`` call holds every set, so the reference rows give the scale of each number:

    real                              the reference: real held-out patches (never trained on)
    real held-out vs real training    the floor: real training patches against the reference
    tokenizer reconstructions         the same training patches, encoded and decoded (the
                                      best a prior on this tokenizer can do)
    model                             pairs sampled from the run (or ``synthetic: DIR``)
    weak: marginal tokens             independent per-position tokens from each label's
                                      training token frequencies, decoded (weak_generator.py)

A model worth anything sits between the floor and the weak baseline on every label;
``scale_check`` lists where it does and where it does not. Real images are tiled to the model's
patch size exactly as for training, and labels come from the same places (--labels CSV,
subfolders, one default label). Generated sets are cached with the features, so a re-run with
the same settings only recomputes what changed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
import torch

from ..ingest import Sample, load_dataset_pairs, load_pairs
from ..generator import Generator, load_generator
from ..mask_classes import BINARY, class_samples
from ..pipeline import RunInfo
from ..reporter import Log, Reporter, reporter_for
from ..sampler import SamplingConfig
from ..sampling_defaults import describe_sampling
from .diversity import LPIPS
from .features import FeatureExtractor, StyleClassifierFeatures
from .images import Pair
from .inputs import (  # noqa: F401 - FEATURE_HELP, dinov2_arch: part of this command's interface
    FEATURE_HELP,
    FLOOR,
    FLOOR_SPLIT,
    RealSets,
    dinov2_arch,
    load_synthetic,
    parse_feature_spec,
    split_real,
    subsample,
    tile_pairs,
)
from .report import REAL, EvalConfig, cached_style_classifier, evaluate_sets, md_table, normalise, to_markdown
from .sets import MODEL, MODEL_FILTERED, RECON, SWAP, WEAK, generated_sets, sample_model  # noqa: F401 - sample_model: for callers

OFFLINE_NOTE = ("No pretrained feature backbone (Inception, DINOv2, UNI ...) is installable here with its "
                "weights inside the package, and nothing is downloaded: deep feature spaces come only from "
                "weights files you pass with --features.")

# -------------------------------------------------------------------------------- scale check
# metric -> True when lower is better; these are the numbers the floor / weak ordering is read on
MAIN_METRICS = {"kid": True, "fid": True, "style_score": False, "image_mask_dice": False,
                "nuclei_per_patch_w1": True, "area_w1_px": True, "foreground_fraction_w1": True}


def scale_check(df: pd.DataFrame, model_set: str = MODEL, floor_set: str | None = None,
                weak_set: str = WEAK) -> pd.DataFrame:
    """Per label, feature space and main metric: floor, model and weak values and where the model sits."""
    floor_set = floor_set or (FLOOR if (df["set"] == FLOOR).any() else FLOOR_SPLIT)
    rows = []
    sub = df[df["metric"].isin(list(MAIN_METRICS))]
    for (label, space, metric), g in sub.groupby(["label", "feature_space", "metric"], sort=False):
        values = dict(zip(g["set"], g["value"]))
        if model_set not in values:
            continue
        m, f, w, r = (values.get(k, float("nan")) for k in (model_set, floor_set, weak_set, RECON))
        lower = MAIN_METRICS[metric]
        better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
        if math.isnan(m):
            verdict = "n/a"
        elif not math.isnan(w) and not better(m, w):
            verdict = "NOT better than weak"
        elif not math.isnan(f) and better(m, f):
            verdict = "better than floor"
        elif math.isnan(f) or math.isnan(w):
            verdict = "incomplete"
        else:
            verdict = "between"
        rows.append(dict(label=label, feature_space=space, metric=metric, floor=f, recon=r, model=m, weak=w,
                         better="lower" if lower else "higher", verdict=verdict))
    return pd.DataFrame(rows, columns=["label", "feature_space", "metric", "floor", "recon", "model", "weak",
                                       "better", "verdict"])


def scale_markdown(check: pd.DataFrame) -> str:
    if check.empty:
        return ""
    body = [[r.label, r.feature_space, r.metric, r.better, r.floor, r.recon, r.model, r.weak, r.verdict]
            for r in check.itertuples()]
    n_between = int((check["verdict"] == "between").sum())
    return "\n".join([
        "", "## Scale check: does the model sit between the floor and the weak baseline?", "",
        f"floor = `{FLOOR}` (or `{FLOOR_SPLIT}`), recon = `{RECON}`, weak = `{WEAK}`. "
        f"{n_between} of {len(check)} (label, metric) entries are between floor and weak. "
        "'better than floor' on a distance usually means the difference is within sampling noise "
        "(compare kid_std) or that the reference is small.", "",
        md_table(["label", "feature space", "metric", "better", "floor", "recon", "model", "weak", "verdict"], body),
        "",
    ])


# --------------------------------------------------------------------------------------- main
@dataclass
class EvaluateResult:
    table: pd.DataFrame
    scale: pd.DataFrame
    out_dir: Path
    metadata: dict = field(default_factory=dict)


@dataclass
class _Inputs:
    """Everything `evaluate` reads, checked before any long computation."""

    generator: Generator | None
    run: RunInfo | None
    samples: list[Sample]
    real_labels: list[str]
    synthetic: list[Sample] | None
    synthetic_what: str
    patch: int
    extractor_specs: list[str]
    parsed: list[FeatureExtractor | str]
    lpips: LPIPS | None
    out: Path
    cache: Path
    config: EvalConfig


def _load(model, images, masks, labels_csv, out, n, features, synthetic, config, patch_size, lpips_weights,
          lpips_linear, cache_dir, device, log: Log) -> _Inputs:
    if model is None and synthetic is None:
        raise ValueError("give --model RUN (to sample from it) and/or --synthetic DIR (pairs already written)")
    if n <= 0:
        raise ValueError(f"--n must be a positive number of pairs per label, got {n}")
    cfg = dataclasses.replace(config or EvalConfig(), device=str(device))
    generator, run = None, None
    if model is not None:
        generator = load_generator(model, device)  # RunError names what is missing
        run = RunInfo.load(model)
        if images is None and masks is None:
            images, masks = Path(run.settings.images), Path(run.settings.masks)
            labels_csv = labels_csv or (Path(run.settings.labels_csv) if run.settings.labels_csv else None)
            log(f"real images: the folders the model was trained on ({images}, {masks})")
    if images is None or masks is None:
        raise ValueError("give --images and --masks (the real pairs to compare with)")
    classes, mask_mode = (run.mask_classes, run.settings.mask_mode) if run is not None else (BINARY, "classes")
    if run is not None and run.settings.dataset is not None and images == Path(run.settings.images):
        samples = load_dataset_pairs(run.settings.dataset)  # the nnU-Net dataset the model was trained on
    else:  # IngestError: missing folders, unpaired files ...
        samples = load_pairs(images, masks, labels_csv, keep_values=classes.keeps_values(mask_mode))
    samples = class_samples(samples, classes, mask_mode)  # real masks as the run's classes
    if not classes.binary:
        cfg = dataclasses.replace(cfg, mask_classes=classes.names, mask_mode=mask_mode)
    real_labels = sorted({s.label for s in samples})
    if generator is not None:
        for label in real_labels:
            generator.label_index(label)  # RunError: a label the model does not know
        patch = generator.patch_size
        if patch_size is not None and patch_size != patch:
            raise ValueError(f"--patch-size {patch_size} differs from the model's patch size {patch}")
    syn_samples, syn_what = None, ""
    if synthetic is not None:
        syn_samples, syn_what = load_synthetic(Path(synthetic), real_labels, keep_values=not classes.binary)
        syn_samples = class_samples(syn_samples, classes)  # written masks hold class ids already
        unknown = sorted({s.label for s in syn_samples} - set(real_labels))
        if unknown:
            raise ValueError(f"--synthetic holds label(s) {unknown} that the real images lack (they have "
                             f"{', '.join(real_labels)})")
        if generator is None:
            patch = patch_size or min(min(s.mask.shape) for s in syn_samples)
    extractor_specs = list(features) or (["style", "colour-texture"] if len(real_labels) >= 2 else ["colour-texture"])
    parsed = [parse_feature_spec(spec, str(device)) for spec in extractor_specs]
    if "style" in parsed and len(real_labels) < 2:
        raise ValueError("--features style needs at least two labels (the classifier tells labels apart)")
    if lpips_weights is not None:
        if not Path(lpips_weights).is_file():
            raise FileNotFoundError(f"--lpips-weights {lpips_weights} does not exist")
        lpips = LPIPS(backbone_weights=lpips_weights, linear_weights=lpips_linear, device=str(device))
    else:
        lpips = LPIPS.from_local(linear_weights=lpips_linear, device=str(device))

    out = Path(out) if out is not None else (Path(model) / "evaluation" if model is not None else Path("evaluation"))
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    # the evaluators work at most at the patch size: upsampling small patches only costs time
    if patch < cfg.segmenter.image_size:
        cfg = dataclasses.replace(cfg, segmenter=dataclasses.replace(
            cfg.segmenter, image_size=patch, crop=min(cfg.segmenter.crop, patch)))
    if patch < cfg.style.image_size:
        cfg = dataclasses.replace(cfg, style=dataclasses.replace(
            cfg.style, image_size=patch, crop=min(cfg.style.crop, max(8, patch * 3 // 4))))
    return _Inputs(generator, run, samples, real_labels, syn_samples, syn_what, patch, extractor_specs, parsed,
                   lpips, out, cache, cfg)


def _build_sets(inputs: _Inputs, model: Path | None, synthetic: Path | None, n: int, n_real: int | None,
                references: bool, sampling: SamplingConfig, device: torch.device, reporter: Reporter
                ) -> tuple[RealSets, dict[str, dict[str, list[Pair]]], str]:
    """(real reference and floor, every judged set in table order, the name of the model's set)."""
    generator, cfg, patch = inputs.generator, inputs.config, inputs.patch
    heldout = inputs.run.heldout_sources if inputs.run is not None else []
    label_names = generator.label_names if generator is not None else inputs.real_labels
    real = split_real(inputs.samples, heldout, patch, label_names, n, n_real, cfg.seed)
    reporter.log(f"reference ('{REAL}'): " + "; ".join(f"{lb}: {d}" for lb, d in real.description.items()))

    sets: dict[str, dict[str, list[Pair]]] = {}
    model_set = MODEL
    if references and real.floor:
        sets[real.floor_name] = real.floor
    if generator is not None:
        sets.update(generated_sets(
            generator, model, real.floor, list(real.reference), n, sampling, device, inputs.cache,
            recon=references and bool(real.floor), sample=inputs.synthetic is None, weak_baseline=references,
            reporter=reporter_for(reporter, progress=cfg.progress), reference=real.reference,
            min_agreement=cfg.filter_min_agreement, filter_order=cfg.filter_order))
    if inputs.synthetic is not None:
        model_set = f"synthetic: {Path(synthetic).name}"
        syn = tile_pairs(inputs.synthetic, patch)
        for label, pairs in syn.items():
            idx = subsample(len(pairs), n, cfg.seed + 7)
            syn[label] = [pairs[i] for i in idx]
        sets[model_set] = syn
        reporter.log(f"judging {inputs.synthetic_what}, tiled to {patch} px "
                     f"({', '.join(f'{lb}: {len(p)}' for lb, p in sorted(syn.items()))})")
    # model rows next to their references in the tables: floor, recon, model, weak
    order = [real.floor_name, RECON, SWAP, model_set, MODEL_FILTERED, WEAK]
    sets = {k: sets[k] for k in sorted(sets, key=lambda k: order.index(k) if k in order else len(order))}
    return real, sets, model_set


def evaluate_run(
    model: Path | None = None,
    images: Path | None = None,
    masks: Path | None = None,
    labels_csv: Path | None = None,
    out: Path | None = None,
    n: int = 500,
    features: Sequence[str] = (),
    synthetic: Path | None = None,
    sampling: SamplingConfig | None = None,
    n_real: int | None = 2000,
    references: bool = True,
    config: EvalConfig | None = None,
    patch_size: int | None = None,
    lpips_weights: Path | None = None,
    lpips_linear: Path | None = None,
    cache_dir: Path | None = None,
    device: torch.device | str = "cpu",
    log: Log | None = None,
    reporter: Reporter | None = None,
) -> EvaluateResult:
    """Everything `pathar-aug evaluate` does: load (every input checked before any long computation),
    build the sets, score them; writes metrics.md, metadata.json and scale_check.csv beside the
    tables of ``evaluate_sets``."""
    reporter = reporter_for(reporter, log)
    device = torch.device(device) if isinstance(device, str) else device
    sampling = sampling or SamplingConfig()
    inputs = _load(model, images, masks, labels_csv, out, n, features, synthetic, config, patch_size, lpips_weights,
                   lpips_linear, cache_dir, device, reporter.log)
    real, sets, model_set = _build_sets(inputs, model, synthetic, n, n_real, references, sampling, device, reporter)
    return _score(inputs, real, sets, model_set, model, n, sampling, reporter)


def _score(inputs: _Inputs, real: RealSets, sets: dict[str, dict[str, list[Pair]]], model_set: str,
           model: Path | None, n: int, sampling: SamplingConfig, reporter: Reporter) -> EvaluateResult:
    cfg, out, cache, lpips = inputs.config, inputs.out, inputs.cache, inputs.lpips
    # feature spaces: the style classifier is trained once, on the reference (cached)
    style_clf = None
    if "style" in inputs.parsed or (cfg.train_style_classifier and len(real.reference) >= 2):
        style_clf = cached_style_classifier({lb: normalise(p) for lb, p in real.reference.items()}, cfg, cache, reporter)
    extractors = [StyleClassifierFeatures(style_clf) if e == "style" else e for e in inputs.parsed]

    reporter.log(f"metrics: {', '.join(e.name for e in extractors)}, style score, mask statistics, image-mask Dice "
                 f"for {', '.join(sets)}")
    df = evaluate_sets(real.reference, sets, extractors, out, cache, config=cfg, style_classifier=style_clf,
                       lpips=lpips, reporter=reporter)
    meta = dict(df.attrs.get("metadata", {}))
    check = scale_check(df, model_set=model_set, floor_set=real.floor_name)
    meta.update({
        "reference": real.description,
        "floor_set": real.floor_name if real.floor else None,
        "model": str(Path(model).resolve()) if model is not None else None,
        "synthetic": inputs.synthetic_what or None,
        "n_per_label": n,
        "patch_size": inputs.patch,
        "sampling": _sampling_record(sampling, inputs.generator.label_names)
        if inputs.synthetic is None and inputs.generator is not None else None,
        "feature_specs": inputs.extractor_specs,
        "diversity": lpips.name if lpips is not None else "mean_pairwise_l2 in each feature space (no local LPIPS weights)",
        "offline_note": OFFLINE_NOTE,
    })
    header = _header(meta, model_set)
    (out / "metrics.md").write_text(header + to_markdown(df, meta).split("\n", 1)[1] + scale_markdown(check))
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    check.to_csv(out / "scale_check.csv", index=False)
    return EvaluateResult(df, check, out, meta)


def _sampling_record(sampling: SamplingConfig, label_names: list[str]) -> dict:
    """The sampling settings as metadata, each label's own setting under its name."""
    return {**dataclasses.asdict(sampling), "by_label": {label_names[i]: own for i, own in sampling.by_label.items()}}


def _header(meta: Mapping, model_set: str) -> str:
    lines = ["# Generation quality", ""]
    ref = "; ".join(f"{lb}: {d}" for lb, d in meta.get("reference", {}).items())
    lines.append(f"Reference set `{REAL}`: {ref}.")
    if meta.get("model"):
        lines.append(f"Model: `{meta['model']}`, {meta['n_per_label']} pairs per label (`{model_set}`), "
                     f"patch size {meta['patch_size']} px.")
    if meta.get("sampling"):
        lines.append(f"Sampling: {describe_sampling(meta['sampling'])}; seed {meta['sampling']['seed']}.")
    if meta.get("synthetic"):
        lines.append(f"Judged pairs (`{model_set}`): {meta['synthetic']}.")
    lines.append(f"Diversity: {meta['diversity']}. {meta['offline_note']}")
    return "\n".join(lines) + "\n"

