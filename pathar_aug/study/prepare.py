"""Prepare a study: split, tiles, the generator, one raw nnU-Net dataset with every case, one preprocessing."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pathar_aug.classical_augment import expand
from pathar_aug.config import save_json
from pathar_aug.ingest import load_pairs
from pathar_aug.mask_classes import class_samples
from pathar_aug.patches import PatchSet, dihedral, make_patches, split_by_image
from pathar_aug.generator import Generator, load_generator
from pathar_aug.pipeline import RUN_FILE, RunError, RunInfo, make_settings, train_run
from pathar_aug.reporter import Log, Reporter, reporter_for
from pathar_aug.sampler import SamplingConfig
from pathar_aug.captured_output import captured
from pathar_aug.study.plan import (
    CLASSES_FILE,
    INSTANCES_FILE,
    Plan,
    Tiles,
    make_plan,
    pick_tiles,
    validation_instances,
)
from pathar_aug.study.settings import (
    BATCH_TAG,
    CPU_MAX_BATCH,
    DATASET_NAME,
    DEFAULT_VAL_FRACTION,
    EXTRA_KINDS,
    KIND_FILTERED,
    KIND_GENERATED,
    KIND_RENDERED,
    KIND_TEXT,
    BenchmarkSettings,
    stable_seed,
)
from pathar_aug.tokenizer import TOKENIZER_PRESETS

# ------------------------------------------------------------------------- writing the dataset
def _write_real_cases(dataset: Path, cases: list[tuple[str, np.ndarray, np.ndarray]], labels: dict[str, str],
                      reporter: Reporter, mask_labels: dict[str, int] | None = None) -> None:
    """Real tiles as plain nnU-Net cases (before any synthetic case, so they stay 'real')."""
    from nnunet_integration.dataset import SyntheticCasesPresent, write_real_cases

    try:
        written = write_real_cases(dataset, cases, labels=labels, resume=True, mask_labels=mask_labels)
    except SyntheticCasesPresent as exc:
        raise RunError(f"{dataset} lacks {len(exc.missing)} real case(s) (e.g. {exc.missing[0]}) but already holds "
                       "synthetic ones; delete the benchmark's --out folder and run again") from None
    if written:
        reporter.log(f"  wrote {len(written)} real tile cases")


def _write_synthetic(dataset: Path, kind: str, seed: int, batch_settings: dict, per_label: dict[str, list[str]],
                     make_chunk: Callable[[str, int, int, int], tuple[torch.Tensor, torch.Tensor]],
                     chunk: int, reporter: Reporter, mask_labels: dict[str, int] | None = None) -> int:
    """Write the synthetic cases of one kind and seed, making only the chunks not committed yet.

    ``make_chunk(label, label_index, start, stop)`` returns (images B x 3 x P x P uint8, masks B x 1 x P x P
    of class ids; ``mask_labels``: their classes, those of the dataset)."""
    from nnunet_integration.cases import committed_ids
    from nnunet_integration.dataset import write_chunks
    from nnunet_integration.manifest import synthetic_case_id

    batch = f"{BATCH_TAG[kind]}-s{seed}"
    ids = {label: [synthetic_case_id(batch, name) for name in names] for label, names in per_label.items()}
    done = committed_ids(dataset, batch)
    if all(i in done for v in ids.values() for i in v):
        return 0
    chunks, parts = [], []
    for li, (label, names) in enumerate(ids.items()):
        for start in range(0, len(names), chunk):
            stop = min(start + chunk, len(names))
            chunks.append(names[start:stop])
            parts.append((label, li, start, stop))

    def cases(c: int):
        images, masks = make_chunk(*parts[c])
        for j, case_id in enumerate(chunks[c]):
            yield case_id, images[j].permute(1, 2, 0).numpy(), masks[j, 0].numpy().astype(np.uint8)

    with reporter.task(f"{KIND_TEXT[kind]} (seed {seed})", total=sum(map(len, chunks))) as task:
        report = write_chunks(dataset, chunks, cases, settings={**batch_settings, "kind": kind, "seed": seed},
                              batch=batch, commit_every=chunk,
                              labels={i: label for label, v in ids.items() for i in v}, on_chunk=task.advance,
                              mask_labels=mask_labels)
    return len(report.written)



# ------------------------------------------------------------------------------- generator
def resolve_split(settings: BenchmarkSettings) -> tuple[float, int]:
    """The validation split: explicit settings, else the model's own split, else 0.2 / seed 0."""
    vf, seed = settings.val_fraction, settings.split_seed
    if settings.model and (vf is None or seed is None):
        run = RunInfo.load(settings.model).settings
        vf = run.val_fraction if vf is None else vf
        seed = run.seed if seed is None else seed
    return (DEFAULT_VAL_FRACTION if vf is None else vf), (0 if seed is None else seed)


def check_heldout(run_dir: Path, val_sources: dict[str, list[str]]) -> None:
    """Every validation source image must be among the run's held-out images (never trained on)."""
    heldout = set(RunInfo.load(run_dir).heldout_sources)
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
               reporter: Reporter) -> tuple[Generator, bool]:
    """(generator, whether it was trained now): the given model, else one trained on the pool in ``out``."""
    if settings.model:
        return load_generator(settings.model, device), False
    run_dir = out / "generator"
    try:
        return load_generator(run_dir, device), False
    except RunError:
        pass
    reporter.log(f"[benchmark] training a generator ({settings.preset} preset) on the real training pool only -> {run_dir}")
    classes = settings.mask_classes
    run_settings = make_settings(Path(settings.images), Path(settings.masks),
                                 Path(settings.labels_csv) if settings.labels_csv else None, settings.preset,
                                 val_fraction=split[0], seed=split[1],
                                 classes=classes.describe() if settings.classes is not None else None,
                                 mask_mode=settings.mask_mode)
    train_run(run_dir, run_settings, device, resume=(run_dir / RUN_FILE).exists(), reporter=reporter)
    return load_generator(run_dir, device), True



# ----------------------------------------------------------------------------------- state
class State:
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


def check_model_classes(model: Path, settings: BenchmarkSettings) -> None:
    """A --model must make the study's mask classes (how the study reads its own masks, --mask-mode,
    is the study's business: a border map is a border map whether it came from instance masks or not)."""
    run = RunInfo.load(model).settings
    mine, theirs = settings.mask_classes, run.mask_classes
    if theirs == mine:
        return
    hint = ("--mask-mode border" if run.mask_mode == "border" else
            "no --classes (binary masks)" if theirs.binary else f"--classes {theirs.describe()}")
    raise RunError(f"--model {model} makes masks of the classes {theirs.describe()}, the benchmark's masks have "
                   f"{mine.describe()}: give the options the model was trained with ({hint})")


def _check_settings(out: Path, settings: BenchmarkSettings, write: bool) -> None:
    """A resumed folder must hold the same settings; a new one must be empty. ``write``: record them."""
    path = out / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        now = json.loads(json.dumps(settings.to_json()))
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            try:  # as the folder's settings read (an option it leaves out holds its value from before the option)
                stored = json.loads(json.dumps(dataclasses.asdict(BenchmarkSettings.from_json(before))))
            except (TypeError, ValueError):
                stored = before
            detail = "; ".join(f"{k}: {stored.get(k, before.get(k))!r} there, {now.get(k, getattr(settings, k, None))!r} "
                               "here" for k in diff)
            raise ValueError(f"{out} holds a benchmark made with other settings ({detail}); give its settings to "
                             "resume it, or choose another --out")
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


def prepare(settings: BenchmarkSettings, out: str | Path, device: torch.device, log: Log | None = None,
            show_progress: bool = True, reporter: Reporter | None = None) -> Prepared:
    """Split, pick tiles, (train or load) the generator, and write the one raw nnU-Net dataset."""
    from nnunet_integration.paths import nnunet_env, resolve_dataset

    reporter = reporter_for(reporter, log, show_progress)
    log = reporter.log
    out = Path(out).resolve()
    _check_settings(out, settings, write=False)  # every check before anything is written
    split = resolve_split(settings)
    classes, mask_mode = settings.mask_classes, settings.mask_mode
    if settings.model:
        check_model_classes(Path(settings.model), settings)
    samples = load_pairs(settings.images, settings.masks, settings.labels_csv,
                         keep_values=classes.keeps_values(mask_mode))
    pool_samples, val_read = split_by_image(samples, split[0], split[1])
    # tiles hold the study's class ids (border maps of a border study); the true instances for
    # AJI / PQ come from the masks as read (a border study's instance masks)
    pool_samples, val_samples = class_samples(pool_samples, classes, mask_mode), class_samples(val_read, classes, mask_mode)
    labels = sorted({s.label for s in samples})
    no_val = [label for label in labels if not any(s.label == label for s in val_samples)]
    if no_val:
        raise ValueError(f"label '{no_val[0]}' has no held-out source image (too few images, or --val-fraction "
                         "too small): every label needs a real validation image")
    groups = settings.groups
    needs_generator = any(g.kind in (KIND_GENERATED, KIND_RENDERED, KIND_FILTERED) for g in groups)
    generator = None
    if settings.model:
        generator = load_generator(settings.model, device) if needs_generator else None
        patch = generator.patch_size if generator else RunInfo.load(settings.model).settings.tokenizer.patch_size
    else:
        patch = TOKENIZER_PRESETS[settings.preset].patch_size if settings.preset in TOKENIZER_PRESETS else None
        if patch is None:
            raise ValueError(f"unknown preset {settings.preset!r}")
    tiles = Tiles(make_patches(pool_samples, patch, labels), make_patches(val_samples, patch, labels), [], [])
    tiles.pool_names, tiles.val_names = Tiles.names(tiles.pool), Tiles.names(tiles.val)
    val_instances = validation_instances(val_read, patch, settings.instances,
                                         multiclass=not classes.binary and mask_mode != "border")
    plan, index = make_plan(settings, tiles, split[1])
    if generator is not None:
        _check_generator(generator, labels, patch)
    if settings.model:
        check_heldout(Path(settings.model), plan.val_sources)
    log(f"[benchmark] {len(labels)} label(s): " + ", ".join(
        f"{label} ({sum(s.label == label for s in pool_samples)} pool / {len(plan.val_sources[label])} validation "
        f"images, {len(plan.val[label])} validation tiles)" for label in labels) + f"; tiles of {patch} px")
    del samples, pool_samples, val_samples, val_read

    _check_settings(out, settings, write=True)
    state = State(out / "state.json")
    model_dir = Path(settings.model) if settings.model else (out / "generator" if needs_generator else None)
    if needs_generator and generator is None:
        t = time.time()
        generator, trained = _generator(settings, out, device, split, reporter)
        if trained:
            state.data["stages"]["generator_training_s"] = round(time.time() - t, 1)
            state.save()
        _check_generator(generator, labels, patch)
        check_heldout(generator.run_dir, plan.val_sources)

    dirs = nnunet_dirs(out)
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with nnunet_env(dirs["raw"], dirs["preprocessed"], dirs["results"]):
        # a binary study keeps the default labels; K classes become dataset.json's labels, so nnU-Net trains K-way
        mask_labels = None if classes.binary else classes.mapping()
        dataset = resolve_dataset(f"Dataset{settings.dataset_id:03d}_{DATASET_NAME}", dirs["raw"], create=True,
                                  labels=mask_labels)
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

    _write_real_cases(dataset, [(name, *arrays(p, i)) for name, (p, i) in sorted(real_cases.items())],
                      {name: p.label_names[int(p.labels[i])] for name, (p, i) in sorted(real_cases.items())}, reporter,
                      mask_labels)
    np.savez_compressed(out / INSTANCES_FILE, **{tiles.val_names[i]: val_instances[i] for i in index["val"]})
    if mask_labels is not None:  # per-class Dice is scored against the validation tiles' class maps
        np.savez_compressed(out / CLASSES_FILE, **{tiles.val_names[i]: tiles.val.masks[i, 0].numpy()
                                                   for i in index["val"]})
    state.data["stages"]["real_cases_s"] = round(time.time() - t, 1)
    state.save()

    from pathar_aug.sampling_defaults import CANDIDATES, resolve_sampling

    given = dict(guidance=settings.guidance, temperature=settings.temperature, top_k=settings.top_k,
                 top_p=settings.top_p)
    sampling = resolve_sampling(model_dir, **given) if model_dir else {k: v or CANDIDATES[0][k] for k, v in given.items()}
    state.data["stages"]["sampling"] = sampling
    batch_settings = {"model": str(model_dir) if model_dir else None, **sampling, "patch": patch}
    for kind in (KIND_GENERATED, *EXTRA_KINDS):
        if kind not in plan.synthetic:
            continue
        t = time.time()
        written = 0
        # the filter's counts over every chunk drawn, a resumed run adding to those of the runs before
        acceptance = {label: [a["candidates"], a["passed"], a["kept"]]
                      for label, a in state.data["stages"].get("filter_acceptance", {}).items()}

        def record_acceptance() -> None:
            state.data["stages"]["filter_acceptance"] = {
                label: dict(zip(("candidates", "passed", "kept"), counts)) for label, counts in acceptance.items()}
            state.save()

        for k in range(settings.seeds):
            written += _write_synthetic(dataset, kind, k, batch_settings, plan.synthetic[kind][k],
                                        _chunk_maker(kind, k, settings, generator, tiles, index, sampling, device,
                                                     acceptance, reporter, record_acceptance),
                                        settings.sample_batch, reporter, mask_labels)
        if written:
            state.data["stages"][f"{kind}_s"] = round(time.time() - t, 1)
            state.save()
            log(f"  {kind}: {written} new cases ({time.time() - t:.0f} s)")
    state.data["stages"]["dataset_written"] = True
    state.save()
    return Prepared(settings, out, plan, dataset, patch, split, model_dir, dirs)


def _chunk_maker(kind: str, seed: int, settings: BenchmarkSettings, generator: Generator | None, tiles: Tiles,
                 index: dict, sampling: dict, device: torch.device, acceptance: dict[str, list[int]],
                 reporter: Reporter, on_acceptance: Callable[[], None] = lambda: None):
    """The function making one chunk of synthetic tiles of ``kind`` for ``_write_synthetic``;
    the filtered kind adds its (candidates, passed, kept) per label to ``acceptance`` and calls
    ``on_acceptance`` after each chunk."""
    pool = tiles.pool

    def config(label: str, start: int) -> SamplingConfig:
        return SamplingConfig(batch_size=settings.sample_batch, seed=stable_seed(kind, seed, label, start), **sampling)

    if kind == KIND_GENERATED:
        def make(label, li, start, stop):
            return generator.generate([generator.label_index(label)] * (stop - start), config(label, start), device)
        return make

    if kind == KIND_FILTERED:
        from pathar_aug.pipeline import ensure_filter
        from pathar_aug.quality_filter import QualityFilter, empty_full_shares, quota

        ensure_filter(generator.run_dir, device, reporter)
        quality = QualityFilter.load(generator.run_dir, device)

        def caps(label: str, start: int, stop: int) -> dict[str, int]:
            """--filter-empty study: empty / full masks at most at the share of this seed's real tiles."""
            if settings.filter_empty == "run":
                return {}  # the filter's own caps: the generator's training patches
            empty, full = empty_full_shares([pool.masks[i, 0].numpy() for i in index["real"][(seed, label)]])
            return {"max_empty": quota(empty, start, stop), "max_full": quota(full, start, stop)}

        def make(label, li, start, stop):
            # oversample, keep the pairs the filter passes (filter_order); a label whose candidates pass too
            # rarely is topped up with the best of the rest, so every group keeps its size
            n = stop - start
            images, masks = generator.generate([generator.label_index(label)] * math.ceil(n * settings.filter_oversample),
                                               config(label, start), device)
            selection = quality.select(images, masks, label, keep=n, order=settings.filter_order,
                                       **caps(label, start, stop))
            pick = torch.tensor(selection.filled(n))
            acceptance[label] = [a + b for a, b in zip(acceptance.get(label, [0, 0, 0]),
                                                       (selection.candidates, selection.passed, len(selection.kept)))]
            on_acceptance()
            return images[pick], masks[pick]
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
        pairs = expand(images, masks, stop, stable_seed("classical", seed, label), settings.classical, start=start)
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


def preprocess(prepared: Prepared, log: Log | None = None, reporter: Reporter | None = None) -> str:
    """nnU-Net's fingerprint, planner and preprocessor, once for every case of every group."""
    from nnunet_integration.paths import nnunet_env
    from nnunet_integration.runner import plan_and_preprocess

    log = reporter_for(reporter, log).log
    state = State(prepared.out / "state.json")
    done = state.data["stages"].get("plans_identifier")
    pre = prepared.dirs["preprocessed"] / prepared.dataset.name
    if done and (pre / f"{done}.json").is_file():
        return done
    log("[benchmark] nnU-Net: verify, fingerprint, plan, preprocess (once for all groups)")
    t = time.time()
    with nnunet_env(*prepared.dirs.values()), captured(prepared.out / "logs" / "nnunet_preprocess.log"):
        identifier = plan_and_preprocess(prepared.settings.dataset_id, cpu_network=prepared.settings.cpu_network(),
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
