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
import hashlib
import json
import logging
import math
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..ingest import DEFAULT_LABEL, IngestError, Sample, load_pairs, read_image, read_mask
from ..patches import PatchSet, make_patches, split_by_image
from ..sampler import SamplingConfig
from ..training import progress_bar
from .diversity import LPIPS
from .features import ColourTextureFeatures, FeatureExtractor, StyleClassifierFeatures, TimmFeatures, load_state_dict_file
from .images import Pair
from .report import REAL, EvalConfig, _cached_style_classifier, _normalise, evaluate_sets, to_markdown

log = logging.getLogger(__name__)
Log = Callable[[str], None]

FLOOR = "real held-out vs real training"
FLOOR_SPLIT = "real vs real (other images)"  # when the given images hold none of the run's held-out ones
RECON = "tokenizer reconstructions"
MODEL = "model"
WEAK = "weak: marginal tokens"

OFFLINE_NOTE = ("No pretrained feature backbone (Inception, DINOv2, UNI ...) is installable here with its "
                "weights inside the package, and nothing is downloaded: deep feature spaces come only from "
                "weights files you pass with --features.")

FEATURE_HELP = (
    "style: the Style-Score classifier's features (trained on your real images; default with 2+ labels). "
    "colour-texture: weight-free colour/gradient histograms (default). "
    "timm:ARCH=PATH[,name=NAME,image_size=224,KEY=VALUE...]: any timm architecture with a local weights file "
    "(KEY=VALUE go to timm.create_model). "
    "dinov2:PATH[,name=NAME]: DINOv2 ViT-S/B/L/g-14 weights (size read from the file, run at 224 px). "
    "uni:PATH[,name=NAME]: UNI ViT-L/16 weights."
)


# ------------------------------------------------------------------------------- feature spaces
def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options(parts: Sequence[str], spec: str) -> dict:
    out = {}
    for part in parts:
        if "=" not in part:
            raise ValueError(f"--features {spec!r}: '{part}' is not KEY=VALUE")
        key, value = part.split("=", 1)
        out[key.strip()] = _value(value.strip())
    return out


_DINOV2 = {384: ("vit_small_patch14_dinov2", "S"), 768: ("vit_base_patch14_dinov2", "B"),
           1024: ("vit_large_patch14_dinov2", "L"), 1536: ("vit_giant_patch14_dinov2", "g")}


def _dinov2_arch(path: Path) -> tuple[str, str]:
    sd = load_state_dict_file(path)
    dim = next((v.shape[-1] for k, v in sd.items() if k.endswith("cls_token")), None)
    if dim not in _DINOV2:
        raise ValueError(f"{path} does not look like a DINOv2 ViT checkpoint (no cls_token of width "
                         f"{'/'.join(map(str, _DINOV2))}); use timm:ARCH=PATH instead")
    return _DINOV2[dim]


def parse_feature_spec(spec: str, device: str = "auto") -> FeatureExtractor | str:
    """One --features value -> an extractor, or "style" (the classifier is trained later)."""
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    kind = kind.lower()
    if not rest and kind in ("style", "style-classifier"):
        return "style"
    if not rest and kind in ("colour-texture", "color-texture", "colour", "color"):
        return ColourTextureFeatures()
    if kind in ("timm", "dinov2", "uni") and rest:
        head, *extra = rest.split(",")
        opts = _options(extra, spec)
        name = opts.pop("name", None)
        image_size = opts.pop("image_size", None)
        trusted = bool(opts.pop("trusted", False))
        if kind == "timm":
            if "=" not in head:
                raise ValueError(f"--features {spec!r}: expected timm:ARCH=PATH")
            arch, path = (s.strip() for s in head.split("=", 1))
            path = Path(path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--features {spec!r}: weights file {path} does not exist (nothing is downloaded)")
            kwargs = opts
        else:
            path = Path(head.strip()).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"--features {spec!r}: weights file {path} does not exist (nothing is downloaded)")
            if kind == "dinov2":
                arch, size = _dinov2_arch(path)
                kwargs = {"img_size": 224, **opts}
                name = name or f"DINOv2-ViT-{size}/14"
            else:
                arch = "vit_large_patch16_224"
                kwargs = {"init_values": 1e-5, "dynamic_img_size": True, **opts}
                name = name or "UNI"
        return TimmFeatures(arch, path, name=name, model_kwargs=kwargs, image_size=image_size, device=device,
                            trusted=trusted)
    raise ValueError(f"--features {spec!r} not understood. Forms: {FEATURE_HELP}")


# ---------------------------------------------------------------------------------- real sets
def _patch_pairs(patches: PatchSet, index: Sequence[int] | None = None) -> list[Pair]:
    idx = range(len(patches)) if index is None else index
    return [(patches.images[i].permute(1, 2, 0).numpy(), patches.masks[i, 0].numpy()) for i in idx]


def _subsample(n_total: int, n: int | None, seed: int) -> list[int]:
    if n is None or n <= 0 or n >= n_total:
        return list(range(n_total))
    return sorted(np.random.default_rng(seed).choice(n_total, n, replace=False).tolist())


@dataclass
class RealSets:
    reference: dict[str, list[Pair]]  # label -> real held-out patches (the "real" row)
    floor: dict[str, list[Pair]]  # label -> real training patches (at most n)
    floor_name: str
    description: dict[str, str]  # label -> where its reference came from


def split_real(samples: list[Sample], heldout_sources: Sequence[str], patch: int, label_names: Sequence[str],
               n_floor: int, n_real: int | None, seed: int = 0) -> RealSets:
    """Per label: the run's held-out images are the reference and the others the floor; a label
    whose given images hold none of them is split in two by source image instead."""
    held = set(heldout_sources)
    by_label: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_label[s.label].append(s)
    reference, floor, description = {}, {}, {}
    all_heldout = True
    for li, label in enumerate(sorted(by_label)):
        group = by_label[label]
        ref = [s for s in group if s.name in held]
        rest = [s for s in group if s.name not in held]
        if ref:
            kind = f"{len({s.name for s in ref})} held-out source images of the run"
        else:
            all_heldout = False
            rest, ref = split_by_image(group, 0.5, seed)
            if not ref:  # a single image: no second half to compare with
                ref, rest = group, []
                kind = "its only source image (no floor row)"
            else:
                kind = f"{len(ref)} of its {len(group)} source images (none are the run's held-out images)"
        ref_p = make_patches(ref, patch, list(label_names))
        reference[label] = _patch_pairs(ref_p, _subsample(len(ref_p), n_real, seed + li))
        description[label] = f"{len(reference[label])} patches of {kind}"
        if rest:
            rest_p = make_patches(rest, patch, list(label_names))
            floor[label] = _patch_pairs(rest_p, _subsample(len(rest_p), n_floor, seed + 1000 + li))
    return RealSets(reference, floor, FLOOR if all_heldout else FLOOR_SPLIT, description)


# ------------------------------------------------------------------------------ synthetic sets
def _tile_pairs(samples: list[Sample], patch: int) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = defaultdict(list)
    labels = sorted({s.label for s in samples})
    patches = make_patches(samples, patch, labels)
    for i, pair in enumerate(_patch_pairs(patches)):
        out[labels[int(patches.labels[i])]].append(pair)
    return dict(out)


def _safe_label(text: str) -> str:  # the label part of a synthetic case name (synthesize._safe)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _nnunet_samples(dataset: Path, real_labels: Sequence[str]) -> tuple[list[Sample], str]:
    from nnunet_integration.dataset import list_cases, read_dataset_json
    from nnunet_integration.manifest import COMMITTED, SYNTHETIC_PREFIX, load_manifest

    dj, _ = read_dataset_json(dataset)
    cases = list_cases(dataset, dj)
    manifest = load_manifest(dataset)
    synthetic = sorted(c for c in (manifest.names(COMMITTED) if manifest else []) if c in cases)
    by_safe = {_safe_label(lb): lb for lb in real_labels}
    label_file = dataset / "pathar_aug_labels.json"
    known = json.loads(label_file.read_text()) if label_file.is_file() else {}
    if synthetic:
        names, what = synthetic, f"{len(synthetic)} synthetic cases of {dataset.name}"
    else:
        names, what = sorted(cases), f"all {len(cases)} cases of {dataset.name} (it holds no synthetic cases)"
    samples = []
    for case in names:
        if case.startswith(SYNTHETIC_PREFIX):
            case_id = case[len(SYNTHETIC_PREFIX):].split("_", 1)[-1]
            safe = case_id.rsplit("-", 1)[0]
            label = by_safe.get(safe, safe)
        elif case in known:
            label = known[case]
        elif len(real_labels) == 1:
            label = real_labels[0]
        else:
            raise IngestError(f"{dataset}: cannot tell the label of case '{case}' (not in pathar_aug_labels.json)")
        entry = cases[case]
        image_path, mask_path = dataset / entry["images"][0], dataset / entry["label"]
        for p in (image_path, mask_path):
            if not p.is_file():
                raise IngestError(f"{dataset}: case '{case}' lists {p}, which does not exist")
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise IngestError(f"{mask_path}: mask size differs from its image")
        samples.append(Sample(case, image, mask, label, image_path, mask_path))
    if not samples:
        raise IngestError(f"{dataset}: no cases to evaluate")
    return samples, what


def load_synthetic(folder: Path, real_labels: Sequence[str]) -> tuple[list[Sample], str]:
    """Pairs already written: an nnU-Net raw dataset (its synthetic cases, or all cases if it has
    none) or a folder with images/ and masks/ (labels: labels.csv, subfolders, or the only label)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{folder}: --synthetic folder does not exist")
    if (folder / "dataset.json").is_file():
        return _nnunet_samples(folder, real_labels)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise IngestError(f"{folder}: expected an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) "
                          "or a folder with images/ and masks/ subfolders")
    csv_path = folder / "labels.csv"
    samples = load_pairs(images, masks, csv_path if csv_path.is_file() else None)
    if {s.label for s in samples} == {DEFAULT_LABEL} and len(real_labels) == 1:
        for s in samples:
            s.label = real_labels[0]
    return samples, f"{len(samples)} pairs from {folder}"


# --------------------------------------------------------------------------------- set caching
def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _cached_pairs(cache: Path | None, key_data: dict,
                  make: Callable[[Path | None], tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[Pair], bool]:
    """(pairs, from_cache): uint8 B x 3 x P x P images and B x 1 x P x P masks, stored as .npz.
    ``make`` gets a scratch folder for partial results (removed once the set is stored)."""
    path = scratch = None
    if cache is not None:
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = cache / "sets" / f"{_safe_label(str(key_data.get('set', 'set')))[:40]}-{key}.npz"
        scratch = path.with_name(path.stem + ".partial")
        if path.is_file():
            with np.load(path) as z:
                return list(zip(z["images"], z["masks"])), True
    images, masks = make(scratch)
    imgs = images.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
    msks = masks[:, 0].numpy().astype(np.uint8)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez_compressed(tmp, images=imgs, masks=msks)
        tmp.replace(path)
        shutil.rmtree(scratch, ignore_errors=True)
    return list(zip(imgs, msks)), False


def _to_tensors(pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).contiguous()
    masks = torch.from_numpy(np.stack([(np.asarray(p[1]) > 0).astype(np.uint8) for p in pairs]))[:, None]
    return images, masks


@torch.no_grad()
def reconstruct(tokenizer, pairs: Sequence[Pair], device: torch.device, batch_size: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode and decode real pairs with the run's tokenizer."""
    images, masks = _to_tensors(pairs)
    out_i, out_m = [], []
    for start in range(0, len(images), batch_size):
        s, a = tokenizer.encode(images[start:start + batch_size].to(device), masks[start:start + batch_size].to(device))
        img, msk = tokenizer.decode(s, a)
        out_i.append(img.cpu())
        out_m.append(msk.cpu())
    return torch.cat(out_i), torch.cat(out_m)


def sample_model(generator, labels: Sequence[int], sampling: SamplingConfig, device: torch.device,
                 on_chunk: Callable[[int], None] | None = None, chunk_dir: Path | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair per entry of ``labels`` (label indices), in chunks of sampling.batch_size that may
    mix labels; chunk c is seeded by (seed, c), so the same settings give the same pairs. With
    ``chunk_dir`` every finished chunk is kept there, so an interrupted run resumes."""
    labels = list(labels)
    images, masks = [], []
    for c, start in enumerate(range(0, len(labels), sampling.batch_size)):
        chunk = labels[start:start + sampling.batch_size]
        path = chunk_dir / f"chunk{c:05d}.pt" if chunk_dir is not None else None
        if path is not None and path.is_file():
            img, msk = torch.load(path, weights_only=True)
        else:
            cfg = dataclasses.replace(sampling, seed=sampling.seed * 1_000_003 + c)
            img, msk = generator.generate(chunk, cfg, device)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save((img, msk), path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
        images.append(img)
        masks.append(msk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return torch.cat(images), torch.cat(masks)


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
    from .report import _md_table

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
        _md_table(["label", "feature space", "metric", "better", "floor", "recon", "model", "weak", "verdict"], body),
        "",
    ])


# --------------------------------------------------------------------------------------- main
@dataclass
class EvaluateResult:
    table: pd.DataFrame
    scale: pd.DataFrame
    out_dir: Path
    metadata: dict = field(default_factory=dict)


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
    log: Log = print,
) -> EvaluateResult:
    """Everything `pathar-aug evaluate` does; input errors raise before any long computation."""
    from ..pipeline import RUN_FILE, load_generator

    if model is None and synthetic is None:
        raise ValueError("give --model RUN (to sample from it) and/or --synthetic DIR (pairs already written)")
    if n <= 0:
        raise ValueError(f"--n must be a positive number of pairs per label, got {n}")
    device = torch.device(device) if isinstance(device, str) else device
    sampling = sampling or SamplingConfig()
    cfg = config or EvalConfig()
    cfg = dataclasses.replace(cfg, device=str(device))

    # ---- inputs, all checked first
    generator, run_info = None, {}
    if model is not None:
        generator = load_generator(model, device)  # RunError names what is missing
        run_info = json.loads((Path(model) / RUN_FILE).read_text())
        if images is None and masks is None:
            images, masks = Path(run_info["settings"]["images"]), Path(run_info["settings"]["masks"])
            labels_csv = labels_csv or (Path(run_info["settings"]["labels_csv"]) if run_info["settings"].get("labels_csv") else None)
            log(f"real images: the folders the model was trained on ({images}, {masks})")
    if images is None or masks is None:
        raise ValueError("give --images and --masks (the real pairs to compare with)")
    samples = load_pairs(images, masks, labels_csv)  # IngestError: missing folders, unpaired files ...
    real_labels = sorted({s.label for s in samples})
    if generator is not None:
        for label in real_labels:
            generator.label_index(label)  # RunError: a label the model does not know
        patch = generator.patch_size
        if patch_size is not None and patch_size != patch:
            raise ValueError(f"--patch-size {patch_size} differs from the model's patch size {patch}")
    syn_samples, syn_what = None, ""
    if synthetic is not None:
        syn_samples, syn_what = load_synthetic(Path(synthetic), real_labels)
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
    lpips = None
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

    # ---- real sets
    heldout = run_info.get("data", {}).get("heldout_sources", []) if run_info else []
    label_names = generator.label_names if generator is not None else real_labels
    real = split_real(samples, heldout, patch, label_names, n, n_real, cfg.seed)
    log(f"reference ('{REAL}'): " + "; ".join(f"{lb}: {d}" for lb, d in real.description.items()))

    # ---- generated sets
    sets: dict[str, dict[str, list[Pair]]] = {}
    model_set = MODEL
    if references and real.floor:
        sets[real.floor_name] = real.floor
    if generator is not None:
        ckpt_id = [_file_id(Path(model) / "tokenizer" / "tokenizer.pt"), _file_id(Path(model) / "prior" / "prior.pt")]
        weak = None
        if references:
            try:
                from .weak_generator import MarginalTokenGenerator

                weak = MarginalTokenGenerator.from_run(model, generator.label_names)
            except FileNotFoundError as exc:
                log(f"no weak baseline: {exc}")
        jobs = []
        if references and real.floor:
            jobs.append(RECON)
        if syn_samples is None:
            jobs.append(MODEL)
        if weak is not None:
            jobs.append(WEAK)
        labels = sorted(real.reference)
        total = sum(len(real.floor.get(lb, [])) if j == RECON else n for j in jobs for lb in labels)
        cached = []
        log(f"generating {', '.join(jobs)}: {total} pairs (cached sets are reused)")
        with progress_bar(disable=not cfg.progress) as bar:
            task = bar.add_task("generate", total=total, info="")
            for job in jobs:
                bar.update(task, info=job)
                key = {"set": job, "labels": labels, "ckpt": ckpt_id, "patch": generator.patch_size}
                if job == RECON:
                    present = [lb for lb in labels if lb in real.floor]
                    owners = [lb for lb in present for _ in real.floor[lb]]
                    inputs = [p for lb in present for p in real.floor[lb]]
                    key["inputs"] = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for p in inputs for a in p)).hexdigest()
                    make = lambda _, inputs=inputs: reconstruct(generator.tokenizer, inputs, device)
                elif job == MODEL:
                    owners = [lb for lb in labels for _ in range(n)]
                    key.update(n=n, sampling=dataclasses.asdict(sampling))
                    make = lambda scratch, owners=owners: sample_model(
                        generator, [generator.label_index(lb) for lb in owners], sampling, device,
                        on_chunk=lambda k: bar.advance(task, k), chunk_dir=scratch)
                else:
                    owners = [lb for lb in labels if weak.has_label(generator.label_index(lb)) for _ in range(n)]
                    key.update(n=n, seed=sampling.seed, tokens=_file_id(Path(model) / "tokens" / "train_tokens.pt"))
                    make = lambda _, owners=owners: weak.generate(generator.tokenizer, [generator.label_index(lb) for lb in owners],
                                                               device, seed=sampling.seed)
                pairs, hit = _cached_pairs(cache, key, make)
                if hit:
                    cached.append(job)
                if hit or job != MODEL:
                    bar.advance(task, len(pairs))
                sets[job] = {}
                for lb, pair in zip(owners, pairs):
                    sets[job].setdefault(lb, []).append(pair)
        if cached:
            log(f"from cache: generated sets {', '.join(cached)}")
    if syn_samples is not None:
        model_set = f"synthetic: {Path(synthetic).name}"
        syn = _tile_pairs(syn_samples, patch)
        for label, pairs in syn.items():
            idx = _subsample(len(pairs), n, cfg.seed + 7)
            syn[label] = [pairs[i] for i in idx]
        sets[model_set] = syn
        log(f"judging {syn_what}, tiled to {patch} px ({', '.join(f'{lb}: {len(p)}' for lb, p in sorted(syn.items()))})")
    # model rows next to their references in the tables: floor, recon, model, weak
    order = [real.floor_name, RECON, model_set, WEAK]
    sets = {k: sets[k] for k in sorted(sets, key=lambda k: order.index(k) if k in order else len(order))}

    # ---- feature spaces: the style classifier is trained once, on the reference (cached)
    style_clf = None
    if "style" in parsed or (cfg.train_style_classifier and len(real.reference) >= 2):
        style_clf = _cached_style_classifier({lb: _normalise(p) for lb, p in real.reference.items()}, cfg, cache)
    extractors = [StyleClassifierFeatures(style_clf) if e == "style" else e for e in parsed]

    log(f"metrics: {', '.join(e.name for e in extractors)}, style score, mask statistics, image-mask Dice "
        f"for {', '.join(sets)}")
    df = evaluate_sets(real.reference, sets, extractors, out, cache, config=cfg, style_classifier=style_clf, lpips=lpips)
    meta = dict(df.attrs.get("metadata", {}))
    check = scale_check(df, model_set=model_set, floor_set=real.floor_name)
    meta.update({
        "reference": real.description,
        "floor_set": real.floor_name if real.floor else None,
        "model": str(Path(model).resolve()) if model is not None else None,
        "synthetic": syn_what or None,
        "n_per_label": n,
        "patch_size": patch,
        "sampling": dataclasses.asdict(sampling) if syn_samples is None and generator is not None else None,
        "feature_specs": extractor_specs,
        "diversity": lpips.name if lpips is not None else "mean_pairwise_l2 in each feature space (no local LPIPS weights)",
        "offline_note": OFFLINE_NOTE,
    })
    header = _header(meta, model_set)
    (out / "metrics.md").write_text(header + to_markdown(df, meta).split("\n", 1)[1] + scale_markdown(check))
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
    check.to_csv(out / "scale_check.csv", index=False)
    return EvaluateResult(df, check, out, meta)


def _header(meta: Mapping, model_set: str) -> str:
    lines = ["# Generation quality", ""]
    ref = "; ".join(f"{lb}: {d}" for lb, d in meta.get("reference", {}).items())
    lines.append(f"Reference set `{REAL}`: {ref}.")
    if meta.get("model"):
        lines.append(f"Model: `{meta['model']}`, {meta['n_per_label']} pairs per label (`{model_set}`), "
                     f"patch size {meta['patch_size']} px.")
    if meta.get("sampling"):
        s = meta["sampling"]
        lines.append(f"Sampling: cfg {s['guidance']}, temperature {s['temperature']}, top-k {s['top_k']}, "
                     f"top-p {s['top_p']}, seed {s['seed']}.")
    if meta.get("synthetic"):
        lines.append(f"Judged pairs (`{model_set}`): {meta['synthetic']}.")
    lines.append(f"Diversity: {meta['diversity']}. {meta['offline_note']}")
    return "\n".join(lines) + "\n"
