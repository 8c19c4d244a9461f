"""`pathar-aug benchmark`: real + synthetic Dice scaling study on nnU-Net v2 (paper Sec. IV-C, Table IV).

Question answered: does adding generated pairs to a few real ones improve an nnU-Net segmenter on
real images, and is it better than the two obvious alternatives?

Design (all counts are *per label*; one nnU-Net per group is trained on all labels together and
its Dice is reported per label):

- The user's image/mask folders are split by source image per label (``patches.split_by_image``):
  the held-out images give a fixed real validation set of ``val`` tiles per label, the rest is the
  real training pool. The generator is trained on the pool only (an existing ``--model`` must have
  held every validation image out: each is checked against its run.json ``data.heldout_sources``).
- Images are tiled to the generator's patch size, so real and synthetic cases are the same size and
  nnU-Net's patch equals the tile.
- Groups (paper): I ``real`` real; II ``n`` synthetic only; III-V ``real`` + 100 / 200 / 400
  synthetic. Two more rows at the largest count (``extra_rows``): mask-conditioned rendering (pool
  masks re-rendered by the generator) and a classical baseline (the real tiles expanded with
  dihedral transforms, elastic deformation and colour jitter, ``classical_augment``).
- ONE raw nnU-Net dataset holds the real training tiles, the validation tiles and every synthetic
  case; it is planned (one pinned plans file) and preprocessed once by nnU-Net. Every group (and
  seed) is one fold of a custom splits_final.json with the same real validation cases; nnU-Net's own
  trainer trains it with one schedule for every fold, its own predictor segments the validation tiles.
- Resumable: finished stages are recorded; nnU-Net folds with a final checkpoint are not retrained
  and each fold's predictions and Dice are cached.

Output (``out``): ``<name>.csv`` (one row per group x label), ``<name>.md`` (paper layout, delta
against group I), ``<name>.png`` (Dice against synthetic count per label), ``<name>.json`` (exact
settings, data, plans, timings, per-case results).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pathar_aug.classical_augment import ClassicalAugment, expand
from pathar_aug.config import save_json
from pathar_aug.ingest import load_pairs
from pathar_aug.patches import PatchSet, dihedral, make_patches, split_by_image
from pathar_aug.pipeline import RUN_FILE, Generator, RunError, load_generator, make_settings, train_run
from pathar_aug.sampler import SamplingConfig
from pathar_aug.tokenizer import TOKENIZER_PRESETS

Log = Callable[[str], None]

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEFAULT_VAL_FRACTION = 0.2
DATASET_NAME = "PatharBenchmark"
REAL_PREFIX = "r-"  # real tile cases: r-<label>-<source>-t<k>

KIND_REAL, KIND_GENERATED, KIND_RENDERED, KIND_CLASSICAL = "real", "generated", "rendered", "classical"
KIND_TEXT = {KIND_GENERATED: "synthetic", KIND_RENDERED: "mask-conditioned", KIND_CLASSICAL: "classical aug."}
BATCH_TAG = {KIND_GENERATED: "gen", KIND_RENDERED: "ren", KIND_CLASSICAL: "cls"}
KEY_LETTER = {KIND_GENERATED: "g", KIND_RENDERED: "m", KIND_CLASSICAL: "c"}
EXTRA_ROWS = ("largest", "all", "none")
SCHEDULES = ("cpu", "full")


# The CPU schedule's batch: nnU-Net's planner sizes the batch for a GPU (for 128 px tiles and a few
# thousand cases it plans dozens); on 2 cores an iteration then takes many seconds. 12 is the
# planner's reference 2D batch. Measured with the CPU plans at 128 px on 2 busy cores: batch 4
# 1.9 s/iteration, batch 12 2.6 s/iteration (a fixed per-iteration cost dominates).
CPU_MAX_BATCH = 12


def cpu_schedule(epochs: int | None = None, iterations: int | None = None):
    """The short CPU schedule: 10 epochs x 20 iterations (about 5 minutes per group on 2 cores at
    128 px, batch 12), 1 validation iteration per epoch (its pseudo Dice is not used here)."""
    from nnunet_integration.trainer import Schedule

    return Schedule(epochs=epochs or 10, iterations_per_epoch=iterations or 20, val_iterations_per_epoch=1,
                    save_every=5)


def full_schedule(epochs: int | None = None, iterations: int | None = None):
    """nnU-Net's standard schedule (1000 epochs x 250 iterations, 50 validation iterations), for GPUs."""
    from nnunet_integration.trainer import Schedule

    return Schedule(epochs=epochs or 1000, iterations_per_epoch=iterations or 250, val_iterations_per_epoch=50,
                    save_every=50)


# ------------------------------------------------------------------------------------ groups
ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV", "XV")


@dataclass(frozen=True)
class Group:
    """One row of the table: ``real`` real tiles + ``extra`` tiles of ``kind``, per label."""

    numeral: str
    real: int
    extra: int
    kind: str  # real | generated | rendered | classical

    @property
    def key(self) -> str:
        parts = ([f"r{self.real}"] if self.real else []) + \
                ([f"{KEY_LETTER[self.kind]}{self.extra}"] if self.extra else [])
        return "-".join(parts)

    @property
    def description(self) -> str:
        if not self.extra:
            return f"{self.real} real"
        return f"{self.real} real + {self.extra} {KIND_TEXT[self.kind]}"

    def to_json(self) -> dict:
        return {"numeral": self.numeral, "key": self.key, "description": self.description, "real": self.real,
                "extra": self.extra, "kind": self.kind}


def plan_groups(real: int, synthetic: Sequence[int], synthetic_only: int | None = None,
                extra_rows: str = "largest") -> list[Group]:
    """The groups, in table order: real only (if 0 is among ``synthetic``), synthetic only
    (``synthetic_only`` generated tiles and no real ones; default the smallest positive count,
    0 = no such row), real + each positive count, then the mask-conditioned and classical rows at
    the largest count (``extra_rows='largest'``), at every positive count (``'all'``) or none."""
    if real < 1:
        raise ValueError(f"--real must be at least 1 real tile per label, got {real}")
    counts = sorted(set(int(s) for s in synthetic))
    if not counts or counts[0] < 0:
        raise ValueError(f"--synthetic must list counts >= 0, got {list(synthetic)}")
    if extra_rows not in EXTRA_ROWS:
        raise ValueError(f"--extra-rows must be one of {', '.join(EXTRA_ROWS)}, got {extra_rows!r}")
    positive = [s for s in counts if s > 0]
    if synthetic_only is None:
        synthetic_only = positive[0] if positive else 0
    if synthetic_only < 0:
        raise ValueError(f"--synthetic-only must be >= 0, got {synthetic_only}")
    rows: list[tuple[int, int, str]] = []
    if 0 in counts:
        rows.append((real, 0, KIND_REAL))
    if synthetic_only:
        rows.append((0, synthetic_only, KIND_GENERATED))
    rows += [(real, s, KIND_GENERATED) for s in positive]
    extra_at = {"largest": positive[-1:], "all": positive, "none": []}[extra_rows]
    for kind in (KIND_RENDERED, KIND_CLASSICAL):
        rows += [(real, s, kind) for s in extra_at]
    if len(rows) > len(ROMAN):
        raise ValueError(f"{len(rows)} groups are too many for one table (at most {len(ROMAN)})")
    return [Group(ROMAN[i], r, e, k) for i, (r, e, k) in enumerate(rows)]


# ---------------------------------------------------------------------------------- settings
@dataclass
class BenchmarkSettings:
    """Everything that defines the study; a resumed ``out`` folder must have been made with the same."""

    images: str = str(DEMO_DATA / "images")
    masks: str = str(DEMO_DATA / "masks")
    labels_csv: str | None = None
    real: int = 30
    synthetic: tuple[int, ...] = (0, 100, 200, 400)
    synthetic_only: int | None = None
    extra_rows: str = "largest"
    val: int = 50  # validation tiles per label
    val_fraction: float | None = None  # of each label's source images; default: the model's, else 0.2
    split_seed: int | None = None  # default: the model's split seed, else 0
    seeds: int = 1  # repeats with other real subsets / synthetic draws / nnU-Net runs
    schedule: str = "cpu"
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None  # nnU-Net batch; default: the planner's, capped at CPU_MAX_BATCH for "cpu"
    model: str | None = None
    preset: str = "cpu"  # generator preset when no model is given
    guidance: float = 1.5
    temperature: float = 0.85
    top_k: int = 100
    top_p: float = 0.92
    sample_batch: int = 32
    dataset_id: int = 980
    classical: ClassicalAugment = field(default_factory=ClassicalAugment)

    def __post_init__(self) -> None:
        self.images, self.masks = str(Path(self.images).resolve()), str(Path(self.masks).resolve())
        self.labels_csv = str(Path(self.labels_csv).resolve()) if self.labels_csv else None
        self.model = str(Path(self.model).resolve()) if self.model else None
        self.synthetic = tuple(sorted(set(int(s) for s in self.synthetic)))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("val", "seeds", "sample_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "iterations", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset id must be 1-999, got {self.dataset_id}")
        plan_groups(self.real, self.synthetic, self.synthetic_only, self.extra_rows)  # validates

    @property
    def groups(self) -> list[Group]:
        return plan_groups(self.real, self.synthetic, self.synthetic_only, self.extra_rows)

    def nnunet_schedule(self):
        return (cpu_schedule if self.schedule == "cpu" else full_schedule)(self.epochs, self.iterations)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["synthetic"] = list(self.synthetic)
        data["classical"] = self.classical.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> "BenchmarkSettings":
        data = dict(data)
        data["classical"] = ClassicalAugment(**data.get("classical", {}))
        data["synthetic"] = tuple(data["synthetic"])
        return cls(**data)


# ------------------------------------------------------------------------------- small helpers
def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-") or "x"


def _seed(*parts) -> int:
    """A stable 31-bit seed from any parts (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Tee(io.TextIOBase):
    """stdout replacement while nnU-Net runs: everything goes to a log file; ``on_line`` sees each line."""

    def __init__(self, path: Path, on_line: Callable[[str], None] | None = None):
        self.file = path.open("a", encoding="utf-8")
        self.on_line, self.buffer = on_line, ""

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.on_line is not None:
            self.buffer += text
            *lines, self.buffer = self.buffer.split("\n")
            for line in lines:
                self.on_line(line)
        return len(text)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def _captured(path: Path, on_line: Callable[[str], None] | None = None) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tee = _Tee(path, on_line)
    try:
        with contextlib.redirect_stdout(tee):
            yield
    finally:
        tee.close()


def _progress(disable: bool):
    from pathar_aug.training import progress_bar

    return progress_bar(disable=disable)


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
            out.append(f"{REAL_PREFIX}{_safe(label)}-{_safe(source)}-t{seen[source]:03d}")
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
    return f"{BATCH_TAG[kind]}-s{seed}", f"{_safe(label)}-{i:05d}"


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


# ------------------------------------------------------------------------- writing the dataset
def _write_real_cases(dataset: Path, cases: list[tuple[str, np.ndarray, np.ndarray]], log: Log) -> None:
    """Real tiles as plain nnU-Net cases (before any synthetic case, so they stay 'real')."""
    from nnunet_integration.atomic import atomic_write_bytes, atomic_write_json
    from nnunet_integration.dataset import list_cases, png_bytes, prepare_pair, read_dataset_json
    from nnunet_integration.manifest import case_files, load_manifest

    listed = set(list_cases(dataset))
    missing = [c for c in cases if c[0] not in listed]
    if not missing:
        return
    if load_manifest(dataset) is not None:
        raise RunError(f"{dataset} lacks {len(missing)} real case(s) (e.g. {missing[0][0]}) but already holds "
                       "synthetic ones; delete the benchmark's --out folder and run again")
    for name, image, mask in missing:
        image, mask = prepare_pair(name, image, mask)
        image_rel, label_rel = case_files(name)
        atomic_write_bytes(dataset / label_rel, png_bytes(mask))  # label first: an image never lacks its label
        atomic_write_bytes(dataset / image_rel, png_bytes(image))
    dj, _ = read_dataset_json(dataset)
    dj["numTraining"] = len(list_cases(dataset, dj))
    atomic_write_json(dataset / "dataset.json", dj)
    log(f"  wrote {len(missing)} real tile cases")


def _committed(dataset: Path) -> set[str]:
    from nnunet_integration.manifest import COMMITTED, load_manifest

    manifest = load_manifest(dataset)
    return set(manifest.names(COMMITTED)) if manifest else set()


def _write_synthetic(dataset: Path, kind: str, seed: int, batch_settings: dict, per_label: dict[str, list[str]],
                     make_chunk: Callable[[str, int, int, int], tuple[torch.Tensor, torch.Tensor]],
                     chunk: int, progress) -> int:
    """Write the synthetic cases of one kind and seed, making only the chunks not committed yet.

    ``make_chunk(label, label_index, start, stop)`` returns (images B x 3 x P x P uint8, masks B x 1 x P x P)."""
    from nnunet_integration.dataset import write_cases
    from nnunet_integration.manifest import SYNTHETIC_PREFIX

    done = _committed(dataset)
    batch = f"{BATCH_TAG[kind]}-s{seed}"
    total = sum(len(v) for v in per_label.values())
    todo = sum(1 for v in per_label.values() for n in v if n not in done)
    if todo == 0:
        return 0
    task = progress.add_task(f"{KIND_TEXT[kind]} (seed {seed})", total=total, info="")

    def cases():
        for li, (label, names) in enumerate(per_label.items()):
            for start in range(0, len(names), chunk):
                stop = min(start + chunk, len(names))
                if all(n in done for n in names[start:stop]):
                    progress.update(task, advance=stop - start)
                    continue
                images, masks = make_chunk(label, li, start, stop)
                for j, name in enumerate(names[start:stop]):
                    case_id = name[len(SYNTHETIC_PREFIX) + len(batch) + 1:]
                    yield case_id, images[j].permute(1, 2, 0).numpy(), masks[j, 0].numpy().astype(np.uint8)
                progress.update(task, advance=stop - start)

    report = write_cases(dataset, cases(), settings={**batch_settings, "kind": kind, "seed": seed},
                         batch=batch, commit_every=chunk)
    return len(report.written)


# ------------------------------------------------------------------------------- generator
def resolve_split(settings: BenchmarkSettings) -> tuple[float, int]:
    """The validation split: explicit settings, else the model's own split, else 0.2 / seed 0."""
    vf, seed = settings.val_fraction, settings.split_seed
    if settings.model and (vf is None or seed is None):
        run = json.loads((Path(settings.model) / RUN_FILE).read_text()) if (Path(settings.model) / RUN_FILE).exists() else None
        if run is None:
            raise RunError(f"{settings.model} is not a pathar-aug run folder (no {RUN_FILE})")
        vf = run["settings"]["val_fraction"] if vf is None else vf
        seed = run["settings"]["seed"] if seed is None else seed
    return (DEFAULT_VAL_FRACTION if vf is None else vf), (0 if seed is None else seed)


def check_heldout(run_dir: Path, val_sources: dict[str, list[str]]) -> None:
    """Every validation source image must be among the run's held-out images (never trained on)."""
    data = json.loads((Path(run_dir) / RUN_FILE).read_text())["data"]
    heldout = set(data.get("heldout_sources", []))
    leaked = [(label, s) for label, sources in val_sources.items() for s in sources if s not in heldout]
    if leaked:
        label, source = leaked[0]
        raise RunError(
            f"validation image '{source}' (label {label}) is not among the held-out images of {run_dir} "
            f"(run.json data.heldout_sources): the generator may have trained on it"
            + (f"; {len(leaked) - 1} more validation image(s) likewise" if len(leaked) > 1 else "")
            + ". Use the split the model was trained with (--val-fraction, --split-seed), or leave out --model "
              "so the benchmark trains a generator on its own training pool")


def _generator(settings: BenchmarkSettings, out: Path, device: torch.device, split: tuple[float, int],
               show_progress: bool, log: Log) -> tuple[Generator, bool]:
    """(generator, whether it was trained now): the given model, else one trained on the pool in ``out``."""
    if settings.model:
        return load_generator(settings.model, device), False
    run_dir = out / "generator"
    try:
        return load_generator(run_dir, device), False
    except RunError:
        pass
    log(f"[benchmark] training a generator ({settings.preset} preset) on the real training pool only -> {run_dir}")
    run_settings = make_settings(Path(settings.images), Path(settings.masks),
                                 Path(settings.labels_csv) if settings.labels_csv else None, settings.preset,
                                 val_fraction=split[0], seed=split[1])
    train_run(run_dir, run_settings, device, resume=(run_dir / RUN_FILE).exists(), show_progress=show_progress,
              log=log)
    return load_generator(run_dir, device), True


# ----------------------------------------------------------------------------------- state
class _State:
    """``out/state.json``: finished stages and their timings (a killed run keeps what it finished)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"stages": {}, "folds": {}}

    def save(self) -> None:
        save_json(self.data, self.path)


def _check_generator(generator: Generator, labels: list[str], patch: int) -> None:
    if generator.patch_size != patch:
        raise RunError(f"the generator makes {generator.patch_size} px patches, the benchmark tiles are {patch} px")
    unknown = [label for label in labels if label not in generator.label_names]
    if unknown:
        raise RunError(f"label '{unknown[0]}' is unknown to the model {generator.run_dir} "
                       f"(it knows {', '.join(generator.label_names)})")


def _check_settings(out: Path, settings: BenchmarkSettings, write: bool) -> None:
    """A resumed folder must hold the same settings; a new one must be empty. ``write``: record them."""
    path = out / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        now = json.loads(json.dumps(settings.to_json()))
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise ValueError(f"{out} holds a benchmark made with other settings ({', '.join(diff)} differ); "
                             "choose another --out or delete it")
        return
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a pathar-aug benchmark folder; choose another --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        save_json(settings.to_json(), path)


# ---------------------------------------------------------------------------------- the run
@dataclass
class Prepared:
    settings: BenchmarkSettings
    out: Path
    plan: Plan
    dataset: Path
    patch_size: int
    split: tuple[float, int]
    model_dir: Path | None
    dirs: dict[str, Path]


def nnunet_dirs(out: Path) -> dict[str, Path]:
    return {"raw": out / "nnUNet_raw", "preprocessed": out / "nnUNet_preprocessed", "results": out / "nnUNet_results"}


def prepare(settings: BenchmarkSettings, out: str | Path, device: torch.device, log: Log = print,
            show_progress: bool = True) -> Prepared:
    """Split, pick tiles, (train or load) the generator, and write the one raw nnU-Net dataset."""
    from nnunet_integration.paths import nnunet_env, resolve_dataset

    out = Path(out).resolve()
    _check_settings(out, settings, write=False)  # every check before anything is written
    split = resolve_split(settings)
    samples = load_pairs(settings.images, settings.masks, settings.labels_csv)
    pool_samples, val_samples = split_by_image(samples, split[0], split[1])
    labels = sorted({s.label for s in samples})
    no_val = [label for label in labels if not any(s.label == label for s in val_samples)]
    if no_val:
        raise ValueError(f"label '{no_val[0]}' has no held-out source image (too few images, or --val-fraction "
                         "too small): every label needs a real validation image")
    groups = settings.groups
    needs_generator = any(g.kind in (KIND_GENERATED, KIND_RENDERED) for g in groups)
    generator = None
    if settings.model:
        generator = load_generator(settings.model, device) if needs_generator else None
        patch = generator.patch_size if generator else \
            json.loads((Path(settings.model) / RUN_FILE).read_text())["settings"]["tokenizer"]["patch_size"]
    else:
        patch = TOKENIZER_PRESETS[settings.preset].patch_size if settings.preset in TOKENIZER_PRESETS else None
        if patch is None:
            raise ValueError(f"unknown preset {settings.preset!r}")
    tiles = Tiles(make_patches(pool_samples, patch, labels), make_patches(val_samples, patch, labels), [], [])
    tiles.pool_names, tiles.val_names = Tiles.names(tiles.pool), Tiles.names(tiles.val)
    plan, index = make_plan(settings, tiles, split[1])
    if generator is not None:
        _check_generator(generator, labels, patch)
    if settings.model:
        check_heldout(Path(settings.model), plan.val_sources)
    log(f"[benchmark] {len(labels)} label(s): " + ", ".join(
        f"{label} ({sum(s.label == label for s in pool_samples)} pool / {len(plan.val_sources[label])} validation "
        f"images, {len(plan.val[label])} validation tiles)" for label in labels) + f"; tiles of {patch} px")
    del samples, pool_samples, val_samples

    _check_settings(out, settings, write=True)
    state = _State(out / "state.json")
    model_dir = Path(settings.model) if settings.model else (out / "generator" if needs_generator else None)
    if needs_generator and generator is None:
        t = time.time()
        generator, trained = _generator(settings, out, device, split, show_progress, log)
        if trained:
            state.data["stages"]["generator_training_s"] = round(time.time() - t, 1)
            state.save()
        _check_generator(generator, labels, patch)
        check_heldout(generator.run_dir, plan.val_sources)

    dirs = nnunet_dirs(out)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with nnunet_env(dirs["raw"], dirs["preprocessed"], dirs["results"]):
        dataset = resolve_dataset(f"Dataset{settings.dataset_id:03d}_{DATASET_NAME}", dirs["raw"], create=True)
    save_json(plan.to_json(), out / "plan.json")
    if state.data["stages"].get("dataset_written"):
        return Prepared(settings, out, plan, dataset, patch, split, model_dir, dirs)

    t = time.time()
    real_cases = {}
    for i in index["val"]:
        real_cases[tiles.val_names[i]] = (tiles.val, i)
    for idx in index["real"].values():
        for i in idx:
            real_cases[tiles.pool_names[i]] = (tiles.pool, i)

    def arrays(patches: PatchSet, i: int) -> tuple[np.ndarray, np.ndarray]:
        return patches.images[i].permute(1, 2, 0).numpy(), patches.masks[i, 0].numpy()

    _write_real_cases(dataset, [(name, *arrays(p, i)) for name, (p, i) in sorted(real_cases.items())], log)
    labels_file = dataset / "pathar_aug_labels.json"
    save_json({name: p.label_names[int(p.labels[i])] for name, (p, i) in sorted(real_cases.items())}, labels_file)
    state.data["stages"]["real_cases_s"] = round(time.time() - t, 1)
    state.save()

    sampling = dict(guidance=settings.guidance, temperature=settings.temperature, top_k=settings.top_k,
                    top_p=settings.top_p)
    batch_settings = {"model": str(model_dir) if model_dir else None, **sampling, "patch": patch}
    with _progress(not show_progress) as progress:
        for kind in (KIND_GENERATED, KIND_RENDERED, KIND_CLASSICAL):
            if kind not in plan.synthetic:
                continue
            t = time.time()
            written = 0
            for k in range(settings.seeds):
                written += _write_synthetic(dataset, kind, k, batch_settings, plan.synthetic[kind][k],
                                            _chunk_maker(kind, k, settings, generator, tiles, index, sampling, device),
                                            settings.sample_batch, progress)
            if written:
                state.data["stages"][f"{kind}_s"] = round(time.time() - t, 1)
                state.save()
                log(f"  {kind}: {written} new cases ({time.time() - t:.0f} s)")
    state.data["stages"]["dataset_written"] = True
    state.save()
    return Prepared(settings, out, plan, dataset, patch, split, model_dir, dirs)


def _chunk_maker(kind: str, seed: int, settings: BenchmarkSettings, generator: Generator | None, tiles: Tiles,
                 index: dict, sampling: dict, device: torch.device):
    """The function making one chunk of synthetic tiles of ``kind`` for ``_write_synthetic``."""
    pool = tiles.pool

    def config(label: str, start: int) -> SamplingConfig:
        return SamplingConfig(batch_size=settings.sample_batch, seed=_seed(kind, seed, label, start), **sampling)

    if kind == KIND_GENERATED:
        def make(label, li, start, stop):
            return generator.generate([generator.label_index(label)] * (stop - start), config(label, start), device)
        return make

    if kind == KIND_RENDERED:
        order: dict[str, list[int]] = {}

        def make(label, li, start, stop):
            # the pool's real masks, spread over its images; cycled with a dihedral transform per pass
            if label not in order:
                order[label] = pick_tiles(pool, li, len(pool), random.Random(f"render-{seed}-{label}"))
            idx = order[label]
            masks = torch.stack([dihedral(pool.masks[idx[i % len(idx)]], (i // len(idx)) % 8)
                                 for i in range(start, stop)])
            images = generator.render_masks(masks, generator.label_index(label), config(label, start), device)
            return images, masks
        return make

    def make(label, li, start, stop):  # classical: the seed's real tiles of this label, augmented
        idx = index["real"][(seed, label)]
        images = [pool.images[i].permute(1, 2, 0).numpy() for i in idx]
        masks = [pool.masks[i, 0].numpy() for i in idx]
        pairs = expand(images, masks, stop, _seed("classical", seed, label), settings.classical, start=start)
        return (torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2),
                torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None])
    return make


def _plans_summary(plans_file: Path) -> dict:
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["2d"]
    kwargs = config["architecture"]["arch_kwargs"]
    return {"plans_identifier": plans["plans_name"], "patch_size": config["patch_size"],
            "batch_size": config["batch_size"], "features_per_stage": kwargs["features_per_stage"],
            "normalization": config.get("normalization_schemes")}


def preprocess(prepared: Prepared, log: Log = print) -> str:
    """nnU-Net's fingerprint, planner and preprocessor, once for every case of every group."""
    from nnunet_integration.paths import nnunet_env
    from nnunet_integration.runner import plan_and_preprocess

    state = _State(prepared.out / "state.json")
    done = state.data["stages"].get("plans_identifier")
    pre = prepared.dirs["preprocessed"] / prepared.dataset.name
    if done and (pre / f"{done}.json").is_file():
        return done
    log("[benchmark] nnU-Net: verify, fingerprint, plan, preprocess (once for all groups)")
    t = time.time()
    with nnunet_env(*prepared.dirs.values()), _captured(prepared.out / "logs" / "nnunet_preprocess.log"):
        identifier = plan_and_preprocess(prepared.settings.dataset_id, cpu_network=prepared.settings.schedule == "cpu",
                                         num_processes=max(1, min(4, os.cpu_count() or 1)),
                                         fingerprint_samples=100_000, keep_splits=False)
    plans_file = pre / f"{identifier}.json"
    planned_batch = json.loads(plans_file.read_text())["configurations"]["2d"]["batch_size"]
    batch = prepared.settings.batch_size
    if batch is None and prepared.settings.schedule == "cpu":
        batch = min(planned_batch, CPU_MAX_BATCH)
    if batch is not None and batch != planned_batch:  # the batch does not change the preprocessed data
        from nnunet_integration.atomic import atomic_write_json

        plans = json.loads(plans_file.read_text())
        plans["configurations"]["2d"]["batch_size"] = batch
        atomic_write_json(plans_file, plans)
    state.data["stages"]["plan_preprocess_s"] = round(time.time() - t, 1)
    state.data["stages"]["plans_identifier"] = identifier
    state.data["stages"]["plans"] = {**_plans_summary(plans_file), "planned_batch_size": planned_batch}
    state.save()
    log(f"  plans {identifier}: {state.data['stages']['plans']} ({time.time() - t:.0f} s)")
    return identifier


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _fold_signature(checkpoint: Path) -> list[int]:
    st = checkpoint.stat()
    return [st.st_size, st.st_mtime_ns]


def train_and_evaluate(prepared: Prepared, identifier: str, device: torch.device, log: Log = print,
                       show_progress: bool = True) -> dict[str, dict]:
    """Write the folds, train each with nnU-Net's trainer (skipping finished ones), segment the
    validation tiles with nnU-Net's predictor and cache per-case Dice; returns fold results by name."""
    from nnunet_integration.dataset import list_cases
    from nnunet_integration.paths import nnunet_env
    from nnunet_integration.runner import dice, model_folder, predict, train_fold
    from nnunet_integration.splits import custom_folds

    settings, plan, out = prepared.settings, prepared.plan, prepared.out
    schedule = settings.nnunet_schedule()
    groups = {g.key: g for g in settings.groups}
    state = _State(out / "state.json")
    results: dict[str, dict] = {}
    cases = list_cases(prepared.dataset)
    val_label = {c: label for label, cs in plan.val.items() for c in cs}
    nn_device = "cuda" if device.type == "cuda" else str(device)
    with nnunet_env(*prepared.dirs.values()):
        folds = [{"train": f["train"], "val": f["val"]} for f in plan.folds]
        splits_file = prepared.dirs["preprocessed"] / prepared.dataset.name / "splits_final.json"
        if not splits_file.is_file() or json.loads(splits_file.read_text()) != folds:
            custom_folds(prepared.dataset, folds, nnunet_preprocessed=prepared.dirs["preprocessed"])
        model_dir = model_folder(settings.dataset_id, identifier)
        with _progress(not show_progress) as progress:
            overall = progress.add_task("nnU-Net groups", total=len(plan.folds), info="")
            for k, fold in enumerate(plan.folds):
                g = groups[fold["group"]]
                name = f"fold{k:02d}-{g.numeral}-{g.key}-seed{fold['seed']}"
                folder = out / "groups" / name
                result_file = folder / "result.json"
                final = model_dir / f"fold_{k}" / "checkpoint_final.pth"
                if result_file.exists() and final.exists():
                    cached = json.loads(result_file.read_text())
                    if cached.get("checkpoint") == _fold_signature(final):
                        cached["reused"] = True
                        results[name] = cached
                        progress.update(overall, advance=1)
                        log(f"  {g.numeral:>4} {g.description} (seed {fold['seed']}): cached, mean Dice "
                            f"{np.mean(list(cached['dice_per_label'].values())):.3f}")
                        continue
                label = f"{g.numeral} {g.description}" + (f" s{fold['seed']}" if settings.seeds > 1 else "")
                progress.update(overall, info=label)
                task = progress.add_task(f"  {label}", total=schedule.epochs, info="")

                def on_line(line: str, task=task) -> None:
                    m = re.search(r"\bEpoch (\d+)\s*$", line)
                    if m:
                        progress.update(task, completed=int(m.group(1)))
                    m = re.search(r"train_loss (-?[\d.]+)", line)
                    if m:
                        progress.update(task, info=f"loss {float(m.group(1)):.3f}")

                resumed_training = final.exists()
                t = time.time()
                with _captured(folder / "nnunet_train.log", on_line):
                    train_fold(settings.dataset_id, k, schedule, device=nn_device, plans_identifier=identifier,
                               num_workers=1 if device.type == "cpu" else None)
                train_s = time.time() - t
                progress.update(task, completed=schedule.epochs)
                t = time.time()
                val_cases = fold["val"]
                with _captured(folder / "nnunet_predict.log"):
                    preds = predict(model_dir, [prepared.dataset / cases[c]["images"][0] for c in val_cases], fold=k,
                                    device=nn_device)
                predict_s = time.time() - t
                per_case, pooled = {}, defaultdict(lambda: [0, 0])
                for c, pred in zip(val_cases, preds):
                    gt = (_read_png(prepared.dataset / cases[c]["label"]) > 0).astype(np.uint8)
                    per_case[c] = dice(pred, gt)
                    pooled[val_label[c]][0] += int(2 * np.logical_and(pred == 1, gt == 1).sum())
                    pooled[val_label[c]][1] += int((pred == 1).sum() + gt.sum())
                np.savez_compressed(folder / "predictions.npz", **{c: p for c, p in zip(val_cases, preds)})
                ckpt = torch.load(final, map_location="cpu", weights_only=False)
                logging = ckpt.get("logging", {})
                epoch_s = [e - s for s, e in zip(logging.get("epoch_start_timestamps", []),
                                                  logging.get("epoch_end_timestamps", []))]
                result = {
                    "fold": k, "seed": fold["seed"], "group": g.to_json(),
                    "n_train": len(fold["train"]), "n_val": len(val_cases),
                    "dice_per_label": {label: float(np.mean([per_case[c] for c in plan.val[label]]))
                                       for label in plan.labels},
                    "pooled_dice_per_label": {label: (pooled[label][0] / pooled[label][1] if pooled[label][1] else 1.0)
                                              for label in plan.labels},
                    "dice_per_case": per_case,
                    "train_s": None if resumed_training else round(train_s, 1),
                    "predict_s": round(predict_s, 1),
                    "epochs": int(ckpt.get("current_epoch", schedule.epochs)),
                    "epoch_s_mean": round(float(np.mean(epoch_s)), 2) if epoch_s else None,
                    "s_per_iteration": round(float(np.mean(epoch_s)) / schedule.iterations_per_epoch, 3) if epoch_s else None,
                    "final_train_loss": float(logging["train_losses"][-1]) if logging.get("train_losses") else None,
                    "checkpoint": _fold_signature(final),
                    "finished": _now(),
                }
                save_json(result, result_file)
                result["reused"] = False
                results[name] = result
                state.data["folds"][name] = {"train_s": result["train_s"], "predict_s": result["predict_s"]}
                state.save()
                progress.remove_task(task)
                progress.update(overall, advance=1)
                log(f"  {g.numeral:>4} {g.description} (seed {fold['seed']}): "
                    + ", ".join(f"{label} {v:.3f}" for label, v in result["dice_per_label"].items())
                    + f"  [train {train_s:.0f} s, predict {predict_s:.0f} s]")
    return results


# -------------------------------------------------------------------------------- reporting
def summarize(settings: BenchmarkSettings, plan: Plan, results: dict[str, dict]) -> list[dict]:
    """One row per group x label: mean (and s.d.) Dice over seeds, delta against group I."""
    groups = settings.groups
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in results.values():
        by_group[r["group"]["key"]].append(r)
    reference = groups[0] if groups and groups[0].kind == KIND_REAL else None
    rows = []
    for g in groups:
        runs = sorted(by_group.get(g.key, []), key=lambda r: r["seed"])
        for label in plan.labels:
            values = [r["dice_per_label"][label] for r in runs]
            pooled = [r["pooled_dice_per_label"][label] for r in runs]
            mean = float(np.mean(values)) if values else float("nan")
            ref = None
            if reference is not None:
                ref_values = [r["dice_per_label"][label] for r in by_group.get(reference.key, [])]
                ref = float(np.mean(ref_values)) if ref_values else None
            rows.append({
                "group": g.numeral, "group_key": g.key, "description": g.description, "kind": g.kind,
                "real_per_label": g.real, "extra_per_label": g.extra, "label": label,
                "n_val_tiles": len(plan.val[label]), "n_val_images": len(plan.val_sources[label]),
                "dice": round(mean, 4),
                "dice_sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else "",
                "delta_vs_I": round(mean - ref, 4) if ref is not None else "",
                "pooled_dice": round(float(np.mean(pooled)), 4) if pooled else "",
                "seeds": len(values), "dice_per_seed": ";".join(f"{v:.4f}" for v in values),
            })
    return rows


def _fmt_delta(d: float) -> str:
    return f"{d:+.3f}"


def markdown_table(settings: BenchmarkSettings, plan: Plan, rows: list[dict], meta: dict) -> str:
    labels = plan.labels
    by = {(r["group"], r["label"]): r for r in rows}
    groups = settings.groups
    has_ref = groups[0].kind == KIND_REAL
    avg = {g.numeral: float(np.mean([by[(g.numeral, label)]["dice"] for label in labels])) for g in groups}
    seeds = settings.seeds
    lines = [
        f"# Real + synthetic Dice scaling (nnU-Net v2, {meta['schedule_text']})",
        "",
        f"Counts are per label; one nnU-Net per group is trained on all {len(labels)} label(s) together and its "
        f"Dice is reported per label on a fixed real validation set (tiles of held-out source images, the same for "
        f"every group). Dice: mean over validation tiles of {meta['patch']} px"
        + (f"; mean over {seeds} seeds" if seeds > 1 else "; one nnU-Net run per group") + ".",
        "",
        "| Group | Training data (per label) | " + " | ".join(labels) + " | Average |",
        "| --- | --- | " + " | ".join("---:" for _ in labels) + " | ---: |",
    ]
    for g in groups:
        cells = []
        for label in labels:
            r = by[(g.numeral, label)]
            text = f"{r['dice']:.3f}"
            if r["dice_sd"] != "":
                text += f" ± {r['dice_sd']:.3f}"
            if has_ref and g is not groups[0] and r["delta_vs_I"] != "":
                text += f" ({_fmt_delta(r['delta_vs_I'])})"
            cells.append(text)
        a = f"{avg[g.numeral]:.3f}"
        if has_ref and g is not groups[0]:
            a += f" ({_fmt_delta(avg[g.numeral] - avg[groups[0].numeral])})"
        lines.append(f"| {g.numeral} | {g.description} | " + " | ".join(cells) + f" | {a} |")
    lines += ["", "Validation set: " + "; ".join(
        f"{label}: {len(plan.val[label])} tiles from {len(plan.val_sources[label])} image(s)" for label in labels) + "."]
    if has_ref:
        lines.append("In brackets: difference to group I (real only).")
    kinds = {g.kind for g in groups}
    if KIND_GENERATED in kinds:
        lines.append(f"Synthetic: pairs sampled by the PathAR generator (label-conditioned; guidance "
                     f"{settings.guidance}, temperature {settings.temperature}, top-k {settings.top_k}, "
                     f"top-p {settings.top_p}).")
    if KIND_RENDERED in kinds:
        lines.append("Mask-conditioned: masks of the real training pool (not only the real tiles of the group) "
                     "re-rendered by the generator (structure tokens from the mask, appearance sampled).")
    if KIND_CLASSICAL in kinds:
        lines.append(f"Classical aug.: {settings.classical.describe()}.")
    lines += ["nnU-Net's own on-line augmentation (rotation, scaling, mirroring, noise, blur, brightness, contrast, "
              "gamma, low resolution) runs in every group.",
              f"nnU-Net: {meta['plans_text']}; schedule {meta['schedule_text']}, identical for every group.",
              f"Generator: {meta['generator_text']}.", ""]
    return "\n".join(lines)


def plot(settings: BenchmarkSettings, plan: Plan, rows: list[dict], path: Path) -> Path:
    """Dice against the number of extra tiles per label: one colour per label (the line is real +
    synthetic, 0 = group I), one marker per other kind of row; black dashes: mean over labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kinds = ((KIND_GENERATED, "x", "synthetic only"), (KIND_RENDERED, "^", "real + mask-conditioned"),
             (KIND_CLASSICAL, "s", "real + classical aug."))

    def err(r):
        return r["dice_sd"] if r["dice_sd"] != "" else 0.0

    def on_line(r):
        return r["kind"] in (KIND_REAL, KIND_GENERATED) and r["real_per_label"] > 0

    # nnU-Net's progress plots change matplotlib's global style (seaborn): draw in the default one
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        handles = []
        for i, label in enumerate(plan.labels):
            c = colors[i % len(colors)]
            mine = [r for r in rows if r["label"] == label]
            line = sorted([r for r in mine if on_line(r)], key=lambda r: r["extra_per_label"])
            if line:
                ax.errorbar([r["extra_per_label"] for r in line], [r["dice"] for r in line],
                            yerr=[err(r) for r in line], color=c, marker="o", capsize=3)
            for kind, marker, _ in kinds:
                pts = [r for r in mine if r["kind"] == kind and not on_line(r)]
                if pts:
                    ax.errorbar([r["extra_per_label"] for r in pts], [r["dice"] for r in pts],
                                yerr=[err(r) for r in pts], color=c, marker=marker, linestyle="none", capsize=3,
                                markersize=8, markerfacecolor="none")
            handles.append(Line2D([], [], color=c, marker="o", label=f"{label}: {settings.real} real + synthetic"))
        mean_line = defaultdict(list)
        for r in rows:
            if on_line(r):
                mean_line[r["extra_per_label"]].append(r["dice"])
        if mean_line:
            xs = sorted(mean_line)
            ax.plot(xs, [float(np.mean(mean_line[x])) for x in xs], color="black", linestyle="--", linewidth=1)
            handles.append(Line2D([], [], color="black", linestyle="--", label="mean over labels"))
        for kind, marker, text in kinds:
            if any(r["kind"] == kind and not on_line(r) for r in rows):
                handles.append(Line2D([], [], color="gray", marker=marker, linestyle="none", markerfacecolor="none",
                                      markersize=8, label=text))
        ax.set_xticks(sorted({r["extra_per_label"] for r in rows}))
        ax.set_xlabel("extra tiles per label (synthetic, mask-conditioned or augmented)")
        ax.set_ylabel("Dice on real validation tiles")
        ax.set_title(f"nnU-Net v2 Dice against synthetic count ({settings.real} real tiles per label)")
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
        plt.close(fig)
    return path


def write_report(prepared: Prepared, identifier: str, results: dict[str, dict], timings: dict,
                 report_dir: Path | None = None, name: str = "dice_scaling") -> dict[str, Path]:
    """CSV, markdown, PNG and JSON into ``report_dir`` (default: the benchmark folder)."""
    import importlib.metadata as md

    settings, plan = prepared.settings, prepared.plan
    report_dir = Path(report_dir or prepared.out)
    report_dir.mkdir(parents=True, exist_ok=True)
    state = _State(prepared.out / "state.json")
    plans = state.data["stages"].get("plans", {})
    schedule = settings.nnunet_schedule()
    rows = summarize(settings, plan, results)
    model = str(prepared.model_dir) if prepared.model_dir else "none needed"
    run_json = prepared.model_dir / RUN_FILE if prepared.model_dir else None
    run_data = json.loads(run_json.read_text()) if run_json and run_json.exists() else None
    meta = {
        "patch": prepared.patch_size,
        "schedule_text": f"{settings.schedule}: {schedule.epochs} epochs x {schedule.iterations_per_epoch} iterations",
        "plans_text": (f"{plans.get('plans_identifier')} (patch {plans.get('patch_size')}, batch "
                       f"{plans.get('batch_size')}, features {plans.get('features_per_stage')})"),
        "generator_text": (f"{model}" + (f" ({run_data['settings']['preset']} preset, trained on "
                                          f"{run_data['data']['train_images']} pool images, "
                                          f"{run_data['data']['heldout_images']} held out)" if run_data else "")),
    }
    paths = {"csv": report_dir / f"{name}.csv", "md": report_dir / f"{name}.md", "png": report_dir / f"{name}.png",
             "json": report_dir / f"{name}.json"}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(markdown_table(settings, plan, rows, meta))
    plot(settings, plan, rows, paths["png"])

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    payload = {
        "what": "real + synthetic Dice scaling study on nnU-Net v2 (PathAR paper Table IV layout)",
        "counts": "per label; one nnU-Net per group trained on all labels, Dice reported per label",
        "settings": settings.to_json(),
        "resolved": {"val_fraction": prepared.split[0], "split_seed": prepared.split[1],
                     "patch_size": prepared.patch_size, "generator": str(prepared.model_dir) if prepared.model_dir else None,
                     "schedule": dataclasses.asdict(schedule), "nnunet_plans": plans,
                     "dataset": str(prepared.dataset), "classical_augmentation": settings.classical.describe()},
        "groups": [g.to_json() for g in settings.groups],
        "validation": {label: {"tiles": len(plan.val[label]), "images": plan.val_sources[label]} for label in plan.labels},
        "rows": rows,
        "folds": {name_: {k: v for k, v in r.items() if k != "dice_per_case"} for name_, r in results.items()},
        "dice_per_case": {name_: r["dice_per_case"] for name_, r in results.items()},
        "timings": timings,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "nnunetv2": version("nnunetv2"), "pathar_aug": version("pathar-aug"),
                        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "generator_run": run_data["settings"] if run_data else None,
        "written": _now(),
    }
    save_json(payload, paths["json"])
    return paths


def run_benchmark(settings: BenchmarkSettings, out: str | Path, device: torch.device, log: Log = print,
                  show_progress: bool = True, report_dir: Path | None = None, name: str = "dice_scaling"
                  ) -> dict[str, Path]:
    """The whole study; returns the report files. A rerun resumes and retrains nothing finished."""
    t0 = time.time()
    started = _now()
    prepared = prepare(settings, out, device, log=log, show_progress=show_progress)
    identifier = preprocess(prepared, log=log)
    log(f"[benchmark] {len(prepared.plan.folds)} nnU-Net fold(s), one per group"
        + (" and seed" if settings.seeds > 1 else "") + f"; schedule {settings.nnunet_schedule()}")
    results = train_and_evaluate(prepared, identifier, device, log=log, show_progress=show_progress)
    state = _State(prepared.out / "state.json")
    stages = state.data["stages"]
    timings = {
        "this_call_s": round(time.time() - t0, 1), "this_call_started": started,
        "stages": {k: v for k, v in stages.items() if k.endswith("_s")},
        "folds": {n: {"train_s": r["train_s"], "predict_s": r["predict_s"], "epoch_s_mean": r["epoch_s_mean"],
                      "s_per_iteration": r["s_per_iteration"], "reused": r["reused"]} for n, r in results.items()},
    }
    fold_train = [r["train_s"] for r in results.values() if r["train_s"] is not None]
    fold_pred = [r["predict_s"] for r in results.values()]
    timings["total_recorded_s"] = round(sum(timings["stages"].values()) + sum(fold_train) + sum(fold_pred), 1)
    paths = write_report(prepared, identifier, results, timings, report_dir, name)
    log(f"[benchmark] done: {', '.join(str(p) for p in paths.values())}")
    return paths
