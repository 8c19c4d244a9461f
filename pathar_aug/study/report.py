"""The study's report: CSV, markdown, plot and JSON, with seeds' spread and paired bootstrap intervals."""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pathar_aug.config import save_json
from pathar_aug.pipeline import RunInfo
from pathar_aug.sampling_defaults import describe_sampling
from pathar_aug.study.plan import Plan
from pathar_aug.study.prepare import Prepared, State
from pathar_aug.study.settings import (
    AVERAGE,
    CLASS_DICE,
    KIND_CLASSICAL,
    KIND_FILTERED,
    KIND_GENERATED,
    KIND_REAL,
    KIND_RENDERED,
    METRICS,
    BenchmarkSettings,
    stable_seed,
    utc_now,
)

# -------------------------------------------------------------------------------- reporting
def summarize(settings: BenchmarkSettings, plan: Plan, results: dict[str, dict]) -> list[dict]:
    """One row per group x label (and per group over all labels, label ``average``): mean and s.d.
    over seeds of Dice, AJI and PQ (and of each class's Dice ``dice_<class>`` in a multi-class
    study), and each metric's difference to group I with a 95 % paired bootstrap interval over
    validation tiles and seeds (``bootstrap.paired_bootstrap``)."""
    from pathar_aug.bootstrap import paired_bootstrap

    groups = settings.groups
    by_group: dict[str, list[dict]] = defaultdict(list)
    for r in results.values():
        by_group[r["group"]["key"]].append(r)
    for runs in by_group.values():
        runs.sort(key=lambda r: r["seed"])
    reference = groups[0] if groups and groups[0].kind == KIND_REAL else None
    ref_runs = {r["seed"]: r for r in by_group.get(reference.key, [])} if reference else {}

    def per_tile(runs: list[dict], metric: str, label: str) -> np.ndarray:
        return np.array([[r[f"{metric}_per_case"][c] for c in plan.val[label]] for r in runs])

    rows = []
    for g in groups:
        runs = by_group.get(g.key, [])
        paired = [r for r in runs if r["seed"] in ref_runs]  # seeds both groups have finished
        for label in plan.labels + [AVERAGE]:
            labels = plan.labels if label == AVERAGE else [label]
            row = {"group": g.numeral, "group_key": g.key, "description": g.description, "kind": g.kind,
                   "real_per_label": g.real, "extra_per_label": g.extra, "label": label,
                   "n_val_tiles": sum(len(plan.val[x]) for x in labels),
                   "n_val_images": sum(len(plan.val_sources[x]) for x in labels), "seeds": len(runs)}
            for metric in settings.metrics:
                values = [float(np.mean([r[f"{metric}_per_label"][x] for x in labels])) for r in runs]
                row[metric] = round(float(np.mean(values)), 4) if values else float("nan")
                row[f"{metric}_sd"] = round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else ""
                prefix = "delta" if metric == "dice" else f"{metric}_delta"
                row[f"{prefix}_vs_I"] = row[f"{prefix}_ci_low"] = row[f"{prefix}_ci_high"] = ""
                if reference is not None and paired:
                    diffs = [per_tile(paired, metric, x) - per_tile([ref_runs[r["seed"]] for r in paired], metric, x)
                             for x in labels]
                    interval = paired_bootstrap(diffs, settings.bootstrap, seed=stable_seed("bootstrap", g.key, label, metric))
                    row[f"{prefix}_vs_I"] = round(interval.mean, 4)
                    row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"] = round(interval.low, 4), round(interval.high, 4)
            row["pooled_dice"] = round(float(np.mean([r["pooled_dice_per_label"][x] for r in runs for x in labels])), 4) \
                if runs else ""
            row["dice_per_seed"] = ";".join(
                f"{np.mean([r['dice_per_label'][x] for x in labels]):.4f}" for r in runs)
            rows.append(row)
    return rows


def curve_rows(results: dict[str, dict], plan: Plan, metrics: Sequence[str] = METRICS) -> list[dict]:
    """The learning curves: group, seed, iteration, label, dice, aji, pq (and any other ``metrics``;
    one row per point and label)."""
    rows = []
    for r in sorted(results.values(), key=lambda r: r["fold"]):
        for point in r.get("curve", []):
            for label in plan.labels:
                rows.append({"group": r["group"]["numeral"], "group_key": r["group"]["key"], "seed": r["seed"],
                             "epoch": point["epoch"], "iteration": point["iteration"], "label": label,
                             **{m: round(point[f"{m}_per_label"][label], 4) for m in metrics}})
    return rows


# The CPU schedule was sized so that group I gains less than this over the last quarter of its
# training (0.845 -> 0.847, cpu_schedule); a group gaining more was still learning when it stopped.
STILL_LEARNING = 0.01


def convergence(curve: list[dict], labels: Sequence[str]) -> list[dict]:
    """Per curve group: Dice at the last two curve points (75 % and 100 % of the schedule) per label
    and on average, mean over the seeds whose curve was measured, and the gain between them.
    A group with more data sees each case fewer times in the same iterations and may not plateau
    where group I does; a gain above ``STILL_LEARNING`` says its difference to group I is read
    before it converged."""
    out = []
    for key in dict.fromkeys(r["group_key"] for r in curve):
        points = [r for r in curve if r["group_key"] == key]
        epochs = sorted({r["epoch"] for r in points})
        if len(epochs) < 2:
            continue
        before, last = epochs[-2:]
        seeds = sorted({r["seed"] for r in points})

        def mean(epoch: int, label: str) -> float:
            return float(np.mean([r["dice"] for r in points if r["epoch"] == epoch and r["label"] == label]))

        per_label = {label: (mean(before, label), mean(last, label)) for label in labels}
        per_label[AVERAGE] = tuple(float(np.mean([v[i] for v in per_label.values()])) for i in (0, 1))
        out.append({"group": points[0]["group"], "group_key": key, "seeds": seeds, "epochs": [before, last],
                    "dice": {label: [round(a, 4), round(b, 4)] for label, (a, b) in per_label.items()},
                    "gain": {label: round(b - a, 4) for label, (a, b) in per_label.items()},
                    "still_learning": [label for label, (a, b) in per_label.items()
                                       if label != AVERAGE and b - a > STILL_LEARNING]})
    return out


def convergence_markdown(rows: list[dict], labels: Sequence[str]) -> list[str]:
    if not rows:
        return []
    lines = ["", "## Convergence", "",
             "Dice gain of the groups with a learning curve over the last quarter of the schedule (epoch "
             f"{rows[0]['epochs'][0]} to {rows[0]['epochs'][1]}; **bold**: more than {STILL_LEARNING}, still "
             "learning when the schedule ended).", "",
             "| Group | Seeds | " + " | ".join(labels) + " | Average |",
             "| --- | --- | " + " | ".join("---:" for _ in labels) + " | ---: |"]
    for r in rows:
        cells = []
        for label in [*labels, AVERAGE]:
            a, b = r["dice"][label]
            text = f"{a:.3f} → {b:.3f} ({_fmt_delta(r['gain'][label])})"
            cells.append(f"**{text}**" if r["gain"][label] > STILL_LEARNING else text)
        lines.append(f"| {r['group']} | {', '.join(map(str, r['seeds']))} | " + " | ".join(cells) + " |")
    learning = [r["group"] for r in rows if r["still_learning"]]
    if learning:
        lines += ["", f"Group(s) {', '.join(learning)} still learning when the schedule ended: the differences "
                      "above are read before convergence (a longer schedule, `--epochs`, would say more)."]
    return lines


def _fmt_delta(d: float) -> str:
    return f"{d:+.3f}"


def _cell(r: dict, metric: str, with_delta: bool) -> str:
    """'mean ± s.d. (delta [low, high])', the delta in bold when its interval excludes 0."""
    text = f"{r[metric]:.3f}" + (f" ± {r[metric + '_sd']:.3f}" if r[metric + "_sd"] != "" else "")
    prefix = "delta" if metric == "dice" else f"{metric}_delta"
    if with_delta and r[f"{prefix}_vs_I"] != "":
        d, lo, hi = r[f"{prefix}_vs_I"], r[f"{prefix}_ci_low"], r[f"{prefix}_ci_high"]
        delta = f"{_fmt_delta(d)} [{_fmt_delta(lo)}, {_fmt_delta(hi)}]"
        text += f" ({'**' + delta + '**' if lo > 0 or hi < 0 else delta})"
    return text


def markdown_table(settings: BenchmarkSettings, plan: Plan, rows: list[dict], meta: dict,
                   converged: list[dict] | None = None) -> str:
    labels = plan.labels
    by = {(r["group"], r["label"]): r for r in rows}
    groups = settings.groups
    has_ref = groups[0].kind == KIND_REAL
    seeds = settings.seeds
    header = "| Group | Training data (per label) | " + " | ".join(labels) + " | Average |"
    rule = "| --- | --- | " + " | ".join("---:" for _ in labels) + " | ---: |"
    lines = [
        f"# Real + synthetic Dice scaling (nnU-Net v2, {meta['schedule_text']})",
        "",
        f"Counts are per label; one nnU-Net per group is trained on all {len(labels)} label(s) together and its "
        f"Dice is reported per label on a fixed real validation set (tiles of held-out source images, the same for "
        f"every group). Every cell: mean over validation tiles of {meta['patch']} px, then mean ± s.d. over "
        f"{seeds} seed(s) (other real tiles, other synthetic draws, other nnU-Net initialisation)"
        + (f"; in brackets the difference to group I with its 95 % paired bootstrap interval over validation tiles "
           f"and seeds ({settings.bootstrap} resamples), **bold** where the interval excludes 0" if has_ref else "")
        + ".",
    ]
    classes = settings.mask_classes
    tables = [("dice", "Dice" if classes.binary else "Dice (foreground: every class but the background)"),
              ("aji", "Aggregated Jaccard index (AJI)"), ("pq", "Panoptic quality (PQ)")]
    tables += [(m, f"Dice of class {m[len(CLASS_DICE):]}") for m in settings.metrics[len(METRICS):]]
    for metric, title in tables:
        lines += ["", f"## {title}", "", header, rule]
        for g in groups:
            cells = [_cell(by[(g.numeral, label)], metric, has_ref and g is not groups[0])
                     for label in labels + [AVERAGE]]
            lines.append(f"| {g.numeral} | {g.description} | " + " | ".join(cells) + " |")
    lines += ["", "Validation set: " + "; ".join(
        f"{label}: {len(plan.val[label])} tiles from {len(plan.val_sources[label])} image(s)" for label in labels) + "."]
    if has_ref:
        lines.append("In brackets: difference to group I (real only), paired by seed and validation tile.")
    predicted = ("recovered from nnU-Net's background / interior / border map (each interior grown through the "
                 "border ring, `border_to_instances`)" if settings.mask_mode == "border"
                 else "the connected components of nnU-Net's segmentation")
    lines.append(f"AJI and PQ: predicted nuclei are {predicted}, true nuclei "
                 f"the instance masks ({meta['instances_text']}); a tile with no nucleus in either scores 1.")
    if not classes.binary:
        lines.append(f"Classes {classes.describe()}: nnU-Net segments all {classes.k} of them; Dice of a class is "
                     "that class against all other pixels, 1 on a tile where neither holds it.")
    kinds = {g.kind for g in groups}
    if kinds & {KIND_GENERATED, KIND_FILTERED}:
        lines.append(f"Synthetic: pairs sampled by the PathAR generator (label-conditioned; {meta['sampling_text']}).")
    if KIND_RENDERED in kinds:
        lines.append("Mask-conditioned: masks of the real training pool (not only the real tiles of the group) "
                     "re-rendered by the generator (structure tokens from the mask, appearance sampled).")
    if KIND_FILTERED in kinds:
        kept = ("the pairs the run's quality filter ranks best kept" if settings.filter_order == "agreement" else
                "the first pairs the run's quality filter passes kept, in the order drawn")
        lines.append(f"Filtered synthetic: {settings.filter_oversample:g} generated pairs drawn per kept one, {kept} "
                     "(image-mask agreement of its own segmenter, empty and full masks at most at the share of "
                     + ("the generator's training patches" if settings.filter_empty == "run" else
                        "the study's real training tiles of that seed") + "); "
                     + meta.get("filter_text", "") + ".")
    if KIND_CLASSICAL in kinds:
        lines.append(f"Classical aug.: {settings.classical.describe()}.")
    lines += ["nnU-Net's own on-line augmentation (rotation, scaling, mirroring, noise, blur, brightness, contrast, "
              "gamma, low resolution) runs in every group.",
              f"nnU-Net: {meta['plans_text']}; schedule {meta['schedule_text']}, identical for every group.",
              f"Generator: {meta['generator_text']}."]
    if meta.get("reference_text"):
        lines.append(meta["reference_text"])
    lines += convergence_markdown(converged or [], labels) + [""]
    return "\n".join(lines)


def plot(settings: BenchmarkSettings, plan: Plan, rows: list[dict], path: Path) -> Path:
    """Dice against the number of extra tiles per label: one colour per label (the line is real +
    synthetic, 0 = group I), one marker per other kind of row; black dashes: mean over labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    kinds = ((KIND_GENERATED, "x", "synthetic only"), (KIND_RENDERED, "^", "real + mask-conditioned"),
             (KIND_CLASSICAL, "s", "real + classical aug."), (KIND_FILTERED, "D", "real + filtered synthetic"))

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


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(prepared: Prepared, identifier: str, results: dict[str, dict], timings: dict,
                 report_dir: Path | None = None, name: str = "dice_scaling") -> dict[str, Path]:
    """CSV, markdown, PNG and JSON into ``report_dir`` (default: the benchmark folder)."""
    import importlib.metadata as md

    settings, plan = prepared.settings, prepared.plan
    report_dir = Path(report_dir or prepared.out)
    report_dir.mkdir(parents=True, exist_ok=True)
    state = State(prepared.out / "state.json")
    plans = state.data["stages"].get("plans", {})
    schedule = settings.nnunet_schedule()
    rows = summarize(settings, plan, results)
    model = str(prepared.model_dir) if prepared.model_dir else "none needed"
    run = RunInfo.find(prepared.model_dir)
    meta = {
        "patch": prepared.patch_size,
        "schedule_text": f"{settings.schedule}: {schedule.epochs} epochs x {schedule.iterations_per_epoch} iterations",
        "plans_text": (f"{plans.get('plans_identifier')} (patch {plans.get('patch_size')}, batch "
                       f"{plans.get('batch_size')}, features {plans.get('features_per_stage')})"),
        "generator_text": (f"{model}" + (f" ({run.settings.preset} preset, trained on "
                                          f"{run.data['train_images']} pool images, "
                                          f"{run.data['heldout_images']} held out)" if run else "")),
        "sampling_text": (describe_sampling(state.data["stages"]["sampling"], run.label_names if run else ())
                          if state.data["stages"].get("sampling") else "")
                         + ("; the generator run's own defaults" if all(
                             getattr(settings, k) is None for k in ("guidance", "temperature", "top_k", "top_p")) else ""),
        "filter_text": "per label, over every chunk drawn (resumed runs included), candidates that passed the "
                       "filter's threshold and passing pairs kept (the rest of each row topped up with the "
                       "best-ranked others): " + ", ".join(
            f"{label} {a['passed']}/{a['candidates']}, {a['kept']} kept"
            for label, a in state.data["stages"].get("filter_acceptance", {}).items()),
        "instances_text": (f"from {settings.instances}" if settings.instances
                           else "the connected components of the class maps' nuclei (every class but the background)"
                           if settings.mask_classes.keeps_values(settings.mask_mode)
                           else "the masks' own instance ids, or their connected components where a mask is binary"),
    }
    taken = sorted((r["group"]["numeral"], r["seed"], str(Path(r["reference"]).parent.parent))
                   for r in results.values() if r.get("reference"))
    if taken:
        meta["reference_text"] = "Not trained in this study (taken from a study of the same data, tiles, seeds and " \
            "nnU-Net settings, `--reference`): " + "; ".join(
                f"group {numeral} seed {seed} from {source}" for numeral, seed, source in taken) + "."
    paths = {"csv": report_dir / f"{name}.csv", "md": report_dir / f"{name}.md", "png": report_dir / f"{name}.png",
             "json": report_dir / f"{name}.json", "curve": report_dir / f"{name}_curve.csv"}
    label_rows = [r for r in rows if r["label"] != AVERAGE]  # the average over labels lives in .md and .json
    _write_csv(paths["csv"], label_rows)
    curve = curve_rows(results, plan, settings.metrics)
    if curve:
        _write_csv(paths["curve"], curve)
    else:
        del paths["curve"]
    converged = convergence(curve, plan.labels)
    paths["md"].write_text(markdown_table(settings, plan, rows, meta, converged))
    plot(settings, plan, label_rows, paths["png"])

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
        "validation": {label: {"tiles": len(plan.val[label]), "images": plan.val_sources[label],
                               "cases": list(plan.val[label])} for label in plan.labels},
        "rows": rows,
        "convergence": converged,
        "folds": {name_: {k: v for k, v in r.items() if not k.endswith("_per_case")} for name_, r in results.items()},
        **{f"{m}_per_case": {name_: r[f"{m}_per_case"] for name_, r in results.items()} for m in settings.metrics},
        "timings": timings,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "nnunetv2": version("nnunetv2"), "pathar_aug": version("pathar-aug"),
                        "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "generator_run": run.settings.to_json() if run else None,
        "written": utc_now(),
    }
    save_json(payload, paths["json"])
    return paths
