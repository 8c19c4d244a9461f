"""Train every fold with nnU-Net's own trainer and score its validation tiles (Dice, AJI, PQ; learning curves)."""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from pathar_aug.config import save_json
from pathar_aug.reporter import Log, Reporter, reporter_for
from pathar_aug.captured_output import captured
from pathar_aug.mask_classes import BINARY, MaskClasses
from pathar_aug.study.plan import CLASSES_FILE, INSTANCES_FILE, Plan
from pathar_aug.study.prepare import Prepared, State
from pathar_aug.study.settings import (
    GENERATOR_ONLY,
    KIND_FILTERED,
    KIND_GENERATED,
    KIND_REAL,
    METRICS,
    BenchmarkSettings,
    class_metrics,
    utc_now,
)

def _fold_signature(checkpoint: Path) -> list[int]:
    st = checkpoint.stat()
    return [st.st_size, st.st_mtime_ns]


def curve_folds(settings: BenchmarkSettings) -> set[tuple[str, int]]:
    """(group key, seed) of the folds whose learning curve is measured: group I in every seed (the
    plateau that sizes the schedule) and the largest real + synthetic group in seed 0 (the most data
    for the same iterations: does it plateau too?; the filtered one when the study has no unfiltered
    rows)."""
    if not settings.curve:
        return set()
    groups = settings.groups
    picked = {(groups[0].key, k) for k in range(settings.seeds)} if groups[0].kind == KIND_REAL else set()
    mixed = ([g for g in groups if g.kind == KIND_GENERATED and g.real > 0]
             or [g for g in groups if g.kind == KIND_FILTERED and g.real > 0])
    if mixed:
        picked.add((max(mixed, key=lambda g: g.extra).key, 0))
    return picked


def score_fold(preds: dict[str, np.ndarray], truth: dict[str, np.ndarray], plan: Plan,
               classes: MaskClasses = BINARY, mask_mode: str = "classes",
               truth_classes: dict[str, np.ndarray] | None = None) -> dict:
    """Per validation case Dice / AJI / PQ, their means per label, and pooled Dice per label.

    Dice is the foreground (every class but the background) against the background; AJI and PQ
    compare ``truth`` (instance maps) with the nuclei of the prediction (``class_instances``: a
    border study's through ``border_to_instances``). With K > 2 classes each foreground class also
    gets its Dice, ``dice_<class>``, against the tiles' true class maps ``truth_classes``."""
    from pathar_aug.instance_metrics import tile_scores
    from pathar_aug.mask_classes import class_instances
    from pathar_aug.metrics import binary_dice, class_dices

    metrics = class_metrics(classes)
    if not classes.binary and truth_classes is None:
        raise ValueError(f"{classes.k} classes are scored against the validation tiles' class maps: give truth_classes")
    per_case = {}
    for c, pred in preds.items():
        per_case[c] = tile_scores(pred, truth[c], class_instances(pred, mask_mode))
        if not classes.binary:
            per_case[c].update(zip(metrics[len(METRICS):], class_dices(pred, truth_classes[c], classes.k)))
    out = {"scores_per_case": per_case}
    for metric in metrics:
        out[f"{metric}_per_label"] = {label: float(np.mean([per_case[c][metric] for c in plan.val[label]]))
                                      for label in plan.labels}
    out["pooled_dice_per_label"] = {  # over all of a label's validation pixels at once
        label: binary_dice(np.concatenate([preds[c].ravel() for c in plan.val[label]]),
                           np.concatenate([truth[c].ravel() for c in plan.val[label]])) for label in plan.labels}
    return out


def check_reference(reference: str | Path, settings: BenchmarkSettings, out: Path) -> Path:
    """``reference`` resolved, when it is another study folder made with the same settings but the
    generator's (``GENERATOR_ONLY``); else a ValueError that names what differs."""
    reference = Path(reference).resolve()
    if not (reference / "settings.json").is_file() or not (reference / "plan.json").is_file():
        raise ValueError(f"--reference {reference} is not a benchmark folder (no settings.json and plan.json)")
    if reference == Path(out).resolve():
        raise ValueError("--reference must be another study folder than --out")
    mine = json.loads(json.dumps(settings.to_json()))
    theirs = json.loads((reference / "settings.json").read_text())
    differ = sorted(k for k in (set(mine) | set(theirs)) - GENERATOR_ONLY if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"--reference {reference} was made with other settings ({', '.join(differ)} differ): "
                         "its group I would not repeat this study's")
    return reference


def reference_folds(reference: str | Path, prepared: Prepared) -> dict[tuple[str, int], dict]:
    """The finished real-only folds of another study folder that this study would repeat, by (group
    key, seed): that study must equal this one in every setting but the generator's
    (``GENERATOR_ONLY``) and in its nnU-Net plans, and each fold must train and validate on the same
    cases. Their results are taken as they are (a group I trained again differs only by nnU-Net's
    run-to-run noise), and the report says so."""
    reference = check_reference(reference, prepared.settings, prepared.out)

    def trained_with(plans: dict | None) -> dict:  # the planner's batch follows the case count; batch_size is used
        return {k: v for k, v in (plans or {}).items() if k != "planned_batch_size"}

    plans = trained_with(State(prepared.out / "state.json").data["stages"].get("plans"))
    their_plans = trained_with(State(reference / "state.json").data["stages"].get("plans"))
    if plans != their_plans:
        raise ValueError(f"--reference {reference} planned nnU-Net otherwise ({their_plans} against {plans})")
    real_only = {g.key for g in prepared.settings.groups if g.kind == KIND_REAL}
    mine_folds = {(f["group"], f["seed"]): f for f in prepared.plan.folds if f["group"] in real_only}
    out = {}
    for k, fold in enumerate(json.loads((reference / "plan.json").read_text())["folds"]):
        key = (fold["group"], fold["seed"])
        if key not in mine_folds or (fold["train"], fold["val"]) != (mine_folds[key]["train"], mine_folds[key]["val"]):
            continue
        found = sorted((reference / "groups").glob(f"fold{k:02d}-*-{fold['group']}-seed{fold['seed']}/result.json"))
        if found:
            result = json.loads(found[0].read_text())
            out[key] = {**result, "reference": str(found[0].parent), "train_s": None, "predict_s": 0.0}
    return out


def train_and_evaluate(prepared: Prepared, identifier: str, device: torch.device, log: Log | None = None,
                       show_progress: bool = True, reporter: Reporter | None = None,
                       reference: str | Path | None = None) -> dict[str, dict]:
    """Write the folds, train each with nnU-Net's trainer (skipping finished ones), segment the
    validation tiles with nnU-Net's predictor and cache per-case Dice, AJI and PQ (and, for the
    curve folds, the same at 25 / 50 / 75 % of the schedule); returns fold results by name.
    ``reference``: another study folder whose finished real-only folds are taken instead of
    training them again (``reference_folds``)."""
    nn_device = "cuda" if device.type == "cuda" else str(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # one core for the network, one for nnU-Net's augmentation worker: with two OpenMP threads
        # beside the worker, epochs on 2 cores took 2-4x longer
        torch.set_num_threads(1)
    try:
        return _train_and_evaluate(prepared, identifier, device, nn_device, reporter_for(reporter, log, show_progress),
                                   reference)
    finally:
        torch.set_num_threads(threads)


def _train_and_evaluate(prepared: Prepared, identifier: str, device: torch.device, nn_device: str,
                        reporter: Reporter, reference: str | Path | None = None) -> dict[str, dict]:
    from nnunet_integration.dataset import list_cases
    from nnunet_integration.paths import nnunet_env
    from nnunet_integration.runner import model_folder, predict, train_fold
    from nnunet_integration.splits import custom_folds
    from nnunet_integration.trainer import snapshot_path

    log = reporter.log
    settings, plan, out = prepared.settings, prepared.plan, prepared.out
    base_schedule = settings.nnunet_schedule()
    with_curve = curve_folds(settings)
    groups = {g.key: g for g in settings.groups}
    state = State(out / "state.json")
    borrowed = reference_folds(reference, prepared) if reference else {}
    results: dict[str, dict] = {}
    cases = list_cases(prepared.dataset)
    classes, mask_mode, metrics = settings.mask_classes, settings.mask_mode, settings.metrics
    with np.load(out / INSTANCES_FILE) as f:
        truth = {c: f[c] for c in f.files}
    truth_classes = None
    if not classes.binary:
        with np.load(out / CLASSES_FILE) as f:
            truth_classes = {c: f[c] for c in f.files}

    def score(preds: dict[str, np.ndarray]) -> dict:
        return score_fold(preds, truth, plan, classes, mask_mode, truth_classes)
    with nnunet_env(*prepared.dirs.values()):
        folds = [{"train": f["train"], "val": f["val"]} for f in plan.folds]
        splits_file = prepared.dirs["preprocessed"] / prepared.dataset.name / "splits_final.json"
        if not splits_file.is_file() or json.loads(splits_file.read_text()) != folds:
            custom_folds(prepared.dataset, folds, nnunet_preprocessed=prepared.dirs["preprocessed"])
        model_dir = model_folder(settings.dataset_id, identifier)
        with reporter.task("nnU-Net groups", total=len(plan.folds)) as overall:
            for k, fold in enumerate(plan.folds):
                g = groups[fold["group"]]
                name = f"fold{k:02d}-{g.numeral}-{g.key}-seed{fold['seed']}"
                folder = out / "groups" / name
                result_file = folder / "result.json"
                final = model_dir / f"fold_{k}" / "checkpoint_final.pth"
                if not result_file.exists() and (g.key, fold["seed"]) in borrowed:
                    folder.mkdir(parents=True, exist_ok=True)
                    save_json(borrowed[(g.key, fold["seed"])], result_file)  # a later resume keeps it
                if result_file.exists():
                    cached = json.loads(result_file.read_text())
                    if cached.get("reference") or (final.exists() and cached.get("checkpoint") == _fold_signature(final)):
                        cached["reused"] = True
                        results[name] = cached
                        overall.advance(1)
                        source = f"taken from {cached['reference']}" if cached.get("reference") else "cached"
                        log(f"  {g.numeral:>4} {g.description} (seed {fold['seed']}): {source}, mean Dice "
                            f"{np.mean(list(cached['dice_per_label'].values())):.3f}")
                        continue
                schedule = base_schedule
                if (g.key, fold["seed"]) in with_curve:
                    schedule = dataclasses.replace(schedule, snapshot_epochs=schedule.curve_epochs())
                label = f"{g.numeral} {g.description}" + (f" s{fold['seed']}" if settings.seeds > 1 else "")
                overall.update(info=label)
                resumed_training = final.exists()
                t = time.time()
                with reporter.task(f"  {label}", total=schedule.epochs) as task:

                    def on_line(line: str, task=task) -> None:
                        m = re.search(r"\bEpoch (\d+)\s*$", line)
                        if m:
                            task.update(completed=int(m.group(1)))
                        m = re.search(r"train_loss (-?[\d.]+)", line)
                        if m:
                            task.update(info=f"loss {float(m.group(1)):.3f}")

                    with captured(folder / "nnunet_train.log", on_line):
                        train_fold(settings.dataset_id, k, schedule, device=nn_device, plans_identifier=identifier,
                                   num_workers=1 if device.type == "cpu" else None)
                train_s = time.time() - t
                t = time.time()
                val_cases = fold["val"]
                images = [prepared.dataset / cases[c]["images"][0] for c in val_cases]

                def segment(checkpoint: str) -> dict[str, np.ndarray]:
                    with captured(folder / "nnunet_predict.log"):
                        preds = predict(model_dir, images, fold=k, checkpoint=checkpoint, device=nn_device)
                    return dict(zip(val_cases, preds))

                preds = segment("checkpoint_final.pth")
                scores = score(preds)
                predict_s = time.time() - t
                curve = []
                for epoch in schedule.snapshot_epochs:
                    point = scores if epoch == schedule.epochs else \
                        score(segment(snapshot_path(final.parent, epoch).name))
                    curve.append({"epoch": epoch, "iteration": epoch * schedule.iterations_per_epoch,
                                  **{f"{m}_per_label": point[f"{m}_per_label"] for m in metrics}})
                np.savez_compressed(folder / "predictions.npz", **preds)
                ckpt = torch.load(final, map_location="cpu", weights_only=False)
                logging = ckpt.get("logging", {})
                epoch_s = [e - s for s, e in zip(logging.get("epoch_start_timestamps", []),
                                                  logging.get("epoch_end_timestamps", []))]
                result = {
                    "fold": k, "seed": fold["seed"], "group": g.to_json(),
                    "n_train": len(fold["train"]), "n_val": len(val_cases),
                    **{key: value for key, value in scores.items() if key != "scores_per_case"},
                    **{f"{m}_per_case": {c: v[m] for c, v in scores["scores_per_case"].items()} for m in metrics},
                    "curve": curve,
                    "train_s": None if resumed_training else round(train_s, 1),
                    "predict_s": round(predict_s, 1),
                    "epochs": int(ckpt.get("current_epoch", schedule.epochs)),
                    "epoch_s_mean": round(float(np.mean(epoch_s)), 2) if epoch_s else None,
                    "s_per_iteration": round(float(np.mean(epoch_s)) / schedule.iterations_per_epoch, 3) if epoch_s else None,
                    "final_train_loss": float(logging["train_losses"][-1]) if logging.get("train_losses") else None,
                    "checkpoint": _fold_signature(final),
                    "finished": utc_now(),
                }
                save_json(result, result_file)
                result["reused"] = False
                results[name] = result
                state.data["folds"][name] = {"train_s": result["train_s"], "predict_s": result["predict_s"]}
                state.save()
                overall.advance(1)
                log(f"  {g.numeral:>4} {g.description} (seed {fold['seed']}): "
                    + ", ".join(f"{label} {v:.3f}" for label, v in result["dice_per_label"].items())
                    + f"  [train {train_s:.0f} s, predict {predict_s:.0f} s]")
    return results
