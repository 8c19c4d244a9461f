"""`pathar-aug demo`: the whole chain on the bundled real data, in one folder, in ~10 CPU minutes."""
from __future__ import annotations

import time
from pathlib import Path
import torch

from nnunet_integration.paths import nnunet_env
from pathar_aug.pipeline import RUN_FILE, make_settings, train_run
from pathar_aug.reporter import Log, Reporter, reporter_for

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_DATASET = "Dataset990_PatharDemo"


def run_demo(out: Path, device: torch.device, tokenizer_steps: int, prior_steps: int, n_per_label: int,
             log: Log | None = None, reporter: Reporter | None = None) -> None:
    """Train (cpu preset, shortened), import the real demo cases, add synthetic ones chosen by the
    quality filter, then run nnU-Net's integrity check and plan-and-preprocess. Re-running resumes
    and skips finished parts."""
    from nnunet_integration.runner import plan_and_preprocess, verify
    from pathar_aug.synthesize import acceptance_lines, import_real, synthesize_into

    reporter = reporter_for(reporter, log)
    log = reporter.log
    t0 = time.time()
    out = Path(out).resolve()
    run = out / "run"
    settings = make_settings(DEMO_DATA / "images", DEMO_DATA / "masks", None, "cpu",
                             {"steps": tokenizer_steps}, {"steps": prior_steps}, val_fraction=0.1)
    log(f"[demo] training the generator on {DEMO_DATA} (BBBC038 subset, CC0) -> {run}")
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
        log("[demo] nnU-Net: verify_dataset_integrity")
        verify(dataset)
        log("[demo] nnU-Net: plan and preprocess (2d)")
        plan_and_preprocess(990, num_processes=2)
    log(f"\n[bold green]demo finished[/bold green] in {time.time() - t0:.0f} s")
    log(f"  generator run:      {run}  (samples: {run / 'samples_preview.png'})")
    log(f"  nnU-Net raw:        {dataset}  (synthetic cases: pathar_aug_manifest.json)")
    log(f"  nnU-Net plans/data: {pre / DEMO_DATASET}  (splits_final.json: real-only validation)")
    log(f"  train nnU-Net:      nnUNet_raw={raw} nnUNet_preprocessed={pre} nnUNet_results={res} "
        "nnUNetv2_train 990 2d 0")
