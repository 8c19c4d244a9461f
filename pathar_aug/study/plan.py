"""Which tiles and cases each fold uses: validation tiles, each seed's real tiles, synthetic case names."""
from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathar_aug.patches import PatchSet, tile_sample
from pathar_aug.study.settings import (
    BATCH_TAG,
    KIND_REAL,
    REAL_PREFIX,
    BenchmarkSettings,
    case_part,
)

# --------------------------------------------------------------------------------- the data
@dataclass
class Tiles:
    """All tiles of the pool and of the validation images, with stable case names."""

    pool: PatchSet
    val: PatchSet
    pool_names: list[str]
    val_names: list[str]

    @staticmethod
    def names(patches: PatchSet) -> list[str]:
        seen: dict[str, int] = defaultdict(int)
        out = []
        for i, source in enumerate(patches.sources):
            label = patches.label_names[int(patches.labels[i])]
            out.append(f"{REAL_PREFIX}{case_part(label)}-{case_part(source)}-t{seen[source]:03d}")
            seen[source] += 1
        return out


def pick_tiles(patches: PatchSet, label: int, n: int, rng: random.Random) -> list[int]:
    """Up to ``n`` tile indices of one label, spread over the source images: round-robin over the
    images in random order, tiles holding nuclei first (empty tiles only when those run out)."""
    by_source: dict[str, list[int]] = defaultdict(list)
    for i in (patches.labels == label).nonzero().flatten().tolist():
        by_source[patches.sources[i]].append(i)
    order = sorted(by_source)
    rng.shuffle(order)
    for source in order:
        rng.shuffle(by_source[source])
    has_fg = patches.masks.flatten(1).any(dim=1)
    picked: list[int] = []
    for want in (True, False):
        queues = [[i for i in by_source[s] if bool(has_fg[i]) == want] for s in order]
        depth = 0
        while len(picked) < n and any(depth < len(q) for q in queues):
            for q in queues:
                if depth < len(q) and len(picked) < n:
                    picked.append(q[depth])
            depth += 1
    return picked


@dataclass
class Plan:
    """Which cases exist and which fold trains on which (all names are nnU-Net case ids)."""

    labels: list[str]
    val: dict[str, list[str]]  # label -> validation cases
    val_sources: dict[str, list[str]]
    real_train: list[dict[str, list[str]]]  # per seed: label -> real training cases
    synthetic: dict[str, list[dict[str, list[str]]]]  # kind -> per seed: label -> case ids (ordered)
    folds: list[dict]  # per fold: seed, group, train, val

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def synthetic_case_id(kind: str, seed: int, label: str, i: int) -> tuple[str, str]:
    """(batch tag, case id) of the i-th synthetic tile of one kind, seed and label."""
    return f"{BATCH_TAG[kind]}-s{seed}", f"{case_part(label)}-{i:05d}"


def make_plan(settings: BenchmarkSettings, tiles: Tiles, split_seed: int = 0) -> tuple[Plan, dict]:
    """Choose the validation tiles, each seed's real training tiles and the synthetic case names;
    returns the plan and the tile indices behind it (for writing the cases)."""
    from nnunet_integration.manifest import synthetic_case_name

    labels = tiles.pool.label_names
    val, val_sources, val_idx = {}, {}, []
    for li, label in enumerate(labels):
        idx = pick_tiles(tiles.val, li, settings.val, random.Random(f"val-{split_seed}-{label}"))
        if not idx:
            raise ValueError(f"label '{label}' has no validation tile; it needs at least 2 source images")
        val[label] = [tiles.val_names[i] for i in idx]
        val_sources[label] = sorted({tiles.val.sources[i] for i in idx})
        val_idx += idx
    real_train, real_idx = [], {}
    for k in range(settings.seeds):
        per_label = {}
        for li, label in enumerate(labels):
            idx = pick_tiles(tiles.pool, li, settings.real, random.Random(f"real-{k}-{label}"))
            if len(idx) < settings.real:
                raise ValueError(f"label '{label}' has only {len(idx)} training tiles of "
                                 f"{tiles.pool.images.shape[-1]} px in its pool; lower --real to at most {len(idx)}")
            per_label[label] = [tiles.pool_names[i] for i in idx]
            real_idx[(k, label)] = idx
        real_train.append(per_label)

    groups = settings.groups
    needed = defaultdict(int)  # kind -> tiles per label
    for g in groups:
        if g.kind != KIND_REAL:
            needed[g.kind] = max(needed[g.kind], g.extra)
    synthetic = {kind: [{label: [synthetic_case_name(*synthetic_case_id(kind, k, label, i)) for i in range(n)]
                         for label in labels} for k in range(settings.seeds)]
                 for kind, n in needed.items()}
    all_val = [c for label in labels for c in val[label]]
    folds = []
    for k in range(settings.seeds):
        for g in groups:
            train = [c for label in labels for c in real_train[k][label][:g.real]]
            if g.extra:
                train += [c for label in labels for c in synthetic[g.kind][k][label][:g.extra]]
            folds.append({"seed": k, "group": g.key, "train": train, "val": all_val})
    plan = Plan(labels, val, val_sources, real_train, synthetic, folds)
    return plan, {"val": val_idx, "real": real_idx, "needed": dict(needed)}



INSTANCES_FILE = "val_instances.npz"  # true instance maps of the validation tiles, by case name
CLASSES_FILE = "val_classes.npz"  # multi-class studies: the true class maps of the validation tiles


def validation_instances(samples: list, patch: int, instances_dir: str | None, multiclass: bool = False
                         ) -> list[np.ndarray]:
    """The instance map of every validation tile, in ``make_patches`` order: from ``instances_dir``
    (a file with each image's stem), else the masks' own ids (a binary mask gives one object per
    connected component). ``samples`` are the masks as read from disk (instance masks of a border
    study, before they become border maps); ``multiclass``: they hold class ids, whose nuclei are
    the connected components of the foreground. Each instance map must cover exactly the mask's
    foreground."""
    from pathar_aug.ingest import MASK_SUFFIXES, read_mask
    from pathar_aug.instance_metrics import instances_from_binary

    out = []
    for sample in samples:
        if instances_dir is not None:
            found = [f for f in sorted(Path(instances_dir).glob(f"{sample.name}.*")) if f.suffix.lower() in MASK_SUFFIXES]
            if not found:
                raise FileNotFoundError(f"{instances_dir}: no instance mask named '{sample.name}.*' for {sample.image_path}")
            ids = read_mask(found[0])
            if ids.shape != sample.mask.shape or not np.array_equal(ids > 0, sample.mask > 0):
                raise ValueError(f"{found[0]}: instance map does not cover the same pixels as {sample.mask_path}")
            sample = dataclasses.replace(sample, mask=ids)
        elif multiclass or sample.mask.max() <= 1:
            sample = dataclasses.replace(sample, mask=instances_from_binary(sample.mask))
        out += [m for _, m in tile_sample(sample, patch, instances=True)]
    return out
