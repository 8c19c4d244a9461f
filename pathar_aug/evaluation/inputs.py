"""What `pathar-aug evaluate` reads: the feature spaces asked for, the real reference and floor sets,
and pairs already written (an nnU-Net raw dataset or plain folders)."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunet_integration.cases import case_labels, list_cases, synthetic_cases

from ..ingest import DEFAULT_LABEL, IngestError, Sample, load_pairs, read_image, read_mask
from ..patches import PatchSet, make_patches, split_by_image
from .features import ColourTextureFeatures, FeatureExtractor, TimmFeatures, load_state_dict_file
from .images import Pair

FLOOR = "real held-out vs real training"
FLOOR_SPLIT = "real vs real (other images)"  # when the given images hold none of the run's held-out ones

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


def dinov2_arch(path: Path) -> tuple[str, str]:
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
                arch, size = dinov2_arch(path)
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
def patch_pairs(patches: PatchSet, index: Sequence[int] | None = None) -> list[Pair]:
    idx = range(len(patches)) if index is None else index
    return [(patches.images[i].permute(1, 2, 0).numpy(), patches.masks[i, 0].numpy()) for i in idx]


def subsample(n_total: int, n: int | None, seed: int) -> list[int]:
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
        reference[label] = patch_pairs(ref_p, subsample(len(ref_p), n_real, seed + li))
        description[label] = f"{len(reference[label])} patches of {kind}"
        if rest:
            rest_p = make_patches(rest, patch, list(label_names))
            floor[label] = patch_pairs(rest_p, subsample(len(rest_p), n_floor, seed + 1000 + li))
    return RealSets(reference, floor, FLOOR if all_heldout else FLOOR_SPLIT, description)


# ------------------------------------------------------------------------------ synthetic sets
def tile_pairs(samples: list[Sample], patch: int) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = defaultdict(list)
    labels = sorted({s.label for s in samples})
    patches = make_patches(samples, patch, labels)
    for i, pair in enumerate(patch_pairs(patches)):
        out[labels[int(patches.labels[i])]].append(pair)
    return dict(out)


def _nnunet_samples(dataset: Path, real_labels: Sequence[str], keep_values: bool = False) -> tuple[list[Sample], str]:
    cases = list_cases(dataset)
    synthetic = synthetic_cases(dataset)
    if synthetic:
        names, what = synthetic, f"{len(synthetic)} synthetic cases of {dataset.name}"
    else:
        names, what = sorted(cases), f"all {len(cases)} cases of {dataset.name} (it holds no synthetic cases)"
    labels = case_labels(dataset, names, real_labels)
    samples = []
    for case in names:
        label = labels[case]
        if label is None:
            raise IngestError(f"{dataset}: cannot tell the label of case '{case}' (not in pathar_aug_labels.json)")
        entry = cases[case]
        image_path, mask_path = dataset / entry["images"][0], dataset / entry["label"]
        for p in (image_path, mask_path):
            if not p.is_file():
                raise IngestError(f"{dataset}: case '{case}' lists {p}, which does not exist")
        image, mask = read_image(image_path), read_mask(mask_path, keep_values)
        if image.shape[:2] != mask.shape:
            raise IngestError(f"{mask_path}: mask size differs from its image")
        samples.append(Sample(case, image, mask, label, image_path, mask_path))
    if not samples:
        raise IngestError(f"{dataset}: no cases to evaluate")
    return samples, what


def load_synthetic(folder: Path, real_labels: Sequence[str], keep_values: bool = False) -> tuple[list[Sample], str]:
    """Pairs already written: an nnU-Net raw dataset (its synthetic cases, or all cases if it has
    none) or a folder with images/ and masks/ (labels: labels.csv, subfolders, or the only label).
    ``keep_values``: masks keep their class ids (multi-class runs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IngestError(f"{folder}: --synthetic folder does not exist")
    if (folder / "dataset.json").is_file():
        return _nnunet_samples(folder, real_labels, keep_values)
    images, masks = folder / "images", folder / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise IngestError(f"{folder}: expected an nnU-Net raw dataset (dataset.json, imagesTr, labelsTr) "
                          "or a folder with images/ and masks/ subfolders")
    csv_path = folder / "labels.csv"
    samples = load_pairs(images, masks, csv_path if csv_path.is_file() else None, keep_values=keep_values)
    if {s.label for s in samples} == {DEFAULT_LABEL} and len(real_labels) == 1:
        for s in samples:
            s.label = real_labels[0]
    return samples, f"{len(samples)} pairs from {folder}"
