"""The whole study in order: prepare, preprocess, train and evaluate every fold, report."""
from __future__ import annotations

import time
from pathlib import Path
import torch

from pathar_aug.reporter import Log, Reporter, reporter_for
from pathar_aug.study.evaluate import check_reference, train_and_evaluate
from pathar_aug.study.prepare import State, prepare, preprocess
from pathar_aug.study.report import write_report
from pathar_aug.study.settings import BenchmarkSettings, utc_now


def run_benchmark(settings: BenchmarkSettings, out: str | Path, device: torch.device, log: Log | None = None,
                  show_progress: bool = True, report_dir: Path | None = None, name: str = "dice_scaling",
                  reporter: Reporter | None = None, reference: str | Path | None = None) -> dict[str, Path]:
    """The whole study; returns the report files. A rerun resumes and retrains nothing finished.
    ``reference``: a finished study of the same data and protocol whose real-only folds are taken
    instead of trained again (``evaluate.reference_folds``)."""
    reporter = reporter_for(reporter, log, show_progress)
    log = reporter.log
    t0 = time.time()
    started = utc_now()
    if reference:
        check_reference(reference, settings, Path(out))  # before hours of preparation
    prepared = prepare(settings, out, device, reporter=reporter)
    identifier = preprocess(prepared, reporter=reporter)
    log(f"[benchmark] {len(prepared.plan.folds)} nnU-Net fold(s), one per group"
        + (" and seed" if settings.seeds > 1 else "") + f"; schedule {settings.nnunet_schedule()}")
    results = train_and_evaluate(prepared, identifier, device, reporter=reporter, reference=reference)
    state = State(prepared.out / "state.json")
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
