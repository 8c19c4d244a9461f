"""`pathar-aug demo`: the whole chain on the bundled real data, in one folder, in ~10 CPU minutes.

The generator starts from the shipped DSB2018 starting point (``starting_points``) and is
fine-tuned on the 36 bundled images: from scratch, minutes of CPU cannot teach it nuclei.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nnunet_integration.paths import nnunet_env
from pathar_aug.pipeline import RUN_FILE, make_settings, train_run
from pathar_aug.reporter import Log, Reporter, reporter_for

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_DATASET = "Dataset990_PatharDemo"
PREVIEW_FILE = "demo_preview.png"
PLAN_LOG = "nnunet_plan_and_preprocess.log"


@dataclass
class LabelCount:
    """Cases of one condition label in a dataset, and how many have empty masks."""

    cases: int = 0
    empty: int = 0

    @property
    def empty_share(self) -> float | None:
        return self.empty / self.cases if self.cases else None


@dataclass
class DatasetSummary:
    """Real and synthetic cases of a dataset per condition label (empty: under 0.2 % foreground,
    the quality filter's rule), and the first few synthetic pairs per label as written (image
    C x H x W, mask) for the preview."""

    real: dict[str, LabelCount] = field(default_factory=dict)
    synthetic: dict[str, LabelCount] = field(default_factory=dict)
    synthetic_pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)


def summarize_dataset(dataset: Path, pairs_per_label: int = 8) -> DatasetSummary:
    """Count real and synthetic cases per label, reading every case once with nnU-Net's reader, and
    keep the first ``pairs_per_label`` synthetic pairs of each label."""
    from nnunet_integration.cases import case_labels, list_cases, read_dataset_json, synthetic_cases
    from nnunet_integration.formats import dataset_format, read_case
    from pathar_aug.quality_filter import foreground_share, is_empty

    dj, _ = read_dataset_json(dataset)
    fmt = dataset_format(dataset, dj)
    cases = list_cases(dataset, dj)
    synthetic = set(synthetic_cases(dataset))
    labels = case_labels(dataset, sorted(cases), [])
    summary = DatasetSummary()
    for name in sorted(cases):
        label = labels[name] or "(no label)"
        case = read_case(dataset, name, cases[name], fmt.reader)
        count = (summary.synthetic if name in synthetic else summary.real).setdefault(label, LabelCount())
        count.cases += 1
        count.empty += is_empty(foreground_share(case.seg))
        kept = summary.synthetic_pairs.setdefault(label, []) if name in synthetic else None
        if kept is not None and len(kept) < pairs_per_label:
            kept.append((case.image, case.seg))
    return summary


def save_dataset_preview(pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]], path: Path) -> Path:
    """One pair of rows per label: synthetic images as written into the dataset, then their masks."""
    from pathar_aug.preview import save_grid

    rows, row_names = [], []
    for label, label_pairs in sorted(pairs.items()):
        images, masks = [], []
        for image, seg in label_pairs:
            image = np.clip(image, 0, 255).astype(np.uint8)
            image = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image[:3]
            images.append(image.transpose(1, 2, 0))
            masks.append(np.repeat(((seg > 0) * 255).astype(np.uint8)[..., None], 3, axis=2))
        rows += [images, masks]
        row_names += [f"{label} image", f"{label} mask"]
    return save_grid(rows, path, names=row_names)


def run_demo(out: Path, device: torch.device, tokenizer_steps: int, prior_steps: int, n_per_label: int,
             init: str | None = "dsb2018", init_tokenizer: str = "freeze", log: Log | None = None,
             reporter: Reporter | None = None) -> DatasetSummary:
    """Fine-tune the generator from ``init`` (None: from scratch) on the bundled data, import the
    real demo cases, add synthetic ones chosen by the quality filter, run nnU-Net's integrity check
    and plan-and-preprocess (its output into ``out/nnunet_plan_and_preprocess.log``), and write a
    preview of the synthetic cases. Re-running resumes and skips finished parts."""
    from nnunet_integration.runner import plan_and_preprocess, verify
    from pathar_aug.captured_output import captured
    from pathar_aug.synthesize import acceptance_lines, import_real, synthesize_into

    reporter = reporter_for(reporter, log)
    log = reporter.log
    t0 = time.time()
    out = Path(out).resolve()
    run = out / "run"
    settings = make_settings(DEMO_DATA / "images", DEMO_DATA / "masks", None, "cpu",
                             {"steps": tokenizer_steps}, {"steps": prior_steps}, val_fraction=0.1,
                             init=init, init_tokenizer=init_tokenizer)
    start = f"from the '{init}' starting point" if init else "from scratch"
    log(f"[demo] fine-tuning the generator {start} on {DEMO_DATA} (BBBC038 subset, CC0) -> {run}")
    train_run(run, settings, device, resume=(run / RUN_FILE).exists(), reporter=reporter)

    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    for folder in (raw, pre, res):
        folder.mkdir(parents=True, exist_ok=True)
    dataset = raw / DEMO_DATASET
    with nnunet_env(raw, pre, res):
        if not (dataset / "dataset.json").exists():
            log(f"[demo] importing the real demo pairs into {dataset}")
            import_real(DEMO_DATA / "images", DEMO_DATA / "masks", str(dataset), reporter=reporter)
        log(f"[demo] synthesizing {n_per_label} pairs per label (quality filter on)")
        result = synthesize_into(run, str(dataset), n_per_label, per_label=True, device=device,
                                 nnunet_preprocessed=pre, quality_filter=True, reporter=reporter)
        for line in acceptance_lines(result):
            log(line)
        log(f"[demo] nnU-Net: integrity check, plan and preprocess (2d); its output: {out / PLAN_LOG}")
        with captured(out / PLAN_LOG):
            verify(dataset)
            plan_and_preprocess(990, num_processes=2)
    summary = summarize_dataset(dataset)
    preview = save_dataset_preview(summary.synthetic_pairs, out / PREVIEW_FILE)

    from pathar_aug.quality_filter import QualityFilter

    # synthetic cases are tiles of the generator's patch size; real cases are whole images, whose
    # tiles are empty more often: both shares are the fair comparison
    tiles = {label: stats.empty_share for label, stats in QualityFilter.load(run, device).stats.items()}
    patch = settings.tokenizer.patch_size
    log(f"\n[bold green]demo finished[/bold green] in {time.time() - t0:.0f} s: {dataset.name}")
    for label in sorted(set(summary.real) | set(summary.synthetic)):
        real, syn = summary.real.get(label, LabelCount()), summary.synthetic.get(label, LabelCount())
        kept = result.labels.get(label)
        filt = f"; filter kept {kept.kept} of {kept.candidates} candidates" if kept and kept.candidates else ""
        share = (lambda c: f"{c.empty_share:.0%}" if c.empty_share is not None else "-")
        tile = f", {tiles[label]:.0%} of its {patch} px training tiles" if label in tiles else ""
        log(f"  {label:<13} real {real.cases:>3} (empty masks {share(real)}{tile}), "
            f"synthetic {syn.cases:>3} of {patch} px (empty {share(syn)}){filt}")
    log(f"  look at:  {preview}  (synthetic pairs as written)")
    log(f"            {run / 'samples_preview.png'}  (the generator's samples)")
    log(f"            {dataset / 'pathar_aug_manifest.json'}  (synthetic cases and their filter scores)")
    log(f"  train nnU-Net:  nnUNet_raw={raw} nnUNet_preprocessed={pre} nnUNet_results={res} "
        "nnUNetv2_train 990 2d 0   (splits_final.json: real-only validation)")
    return summary
