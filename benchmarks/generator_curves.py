"""Learning curves of the shared DSB2018 generator run: what its CPU budget bought, stage by stage.

    python -m benchmarks.generator_curves [--run benchmarks/work/dsb2018_cpu]

Reads the run folder's own logs (written while it trained, across resumed invocations):
tokenizer/tokenizer_loss.csv (training losses, codebook usage, minutes) and prior/prior_loss.csv
plus prior/prior_heldout_curve.csv (held-out NLL of S and A against steps and minutes). Writes
benchmarks/results/generator_curves.csv (long table: stage, step, minutes, metric, value) and
generator_curves.png (tokenizer losses and the prior's training and held-out NLL, against minutes).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from benchmarks.common import RESULTS, WORK

SOURCES = (  # (stage, file in the run folder, columns to keep)
    ("tokenizer", Path("tokenizer") / "tokenizer_loss.csv", ("rec", "seg", "vq_structure", "vq_appearance",
                                                             "usage_structure", "usage_appearance")),
    ("prior", Path("prior") / "prior_loss.csv", ("structure_nll", "appearance_nll")),
    ("prior_heldout", Path("prior") / "prior_heldout_curve.csv", ("heldout_structure_nll", "heldout_appearance_nll")),
)


def read_rows(run: Path) -> list[dict]:
    rows = []
    for stage, name, columns in SOURCES:
        path = run / name
        if not path.is_file():  # a run still training: its finished stages only
            print(f"{path} not written yet: {stage} left out")
            continue
        with path.open() as f:
            for r in csv.DictReader(f):
                for column in columns:
                    if r.get(column) not in (None, ""):
                        rows.append({"stage": stage, "step": int(r["step"]), "minutes": r.get("minutes", ""),
                                     "metric": column, "value": float(r[column])})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for metric in ("rec", "seg"):
        pts = [r for r in rows if r["stage"] == "tokenizer" and r["metric"] == metric]
        axes[0].plot([r["step"] for r in pts], [r["value"] for r in pts], label=f"tokenizer {metric}")
    axes[0].set_xlabel("tokenizer step")
    axes[0].set_ylabel("training loss")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    for stage, metric, style in (("prior", "structure_nll", ":"), ("prior", "appearance_nll", ":"),
                                 ("prior_heldout", "heldout_structure_nll", "-o"),
                                 ("prior_heldout", "heldout_appearance_nll", "-o")):
        pts = [r for r in rows if r["stage"] == stage and r["metric"] == metric]
        axes[1].plot([r["step"] for r in pts], [r["value"] for r in pts], style, label=metric, markersize=3)
    axes[1].set_xlabel("prior step")
    axes[1].set_ylabel("NLL (nats / token)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=WORK / "dsb2018_cpu")
    args = ap.parse_args()
    rows = read_rows(args.run)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "generator_curves.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "step", "minutes", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, RESULTS / "generator_curves.png")
    for stage in ("tokenizer", "prior_heldout"):
        last = [r for r in rows if r["stage"] == stage]
        if last:
            step = max(r["step"] for r in last)
            print(stage, step, {r["metric"]: round(r["value"], 4) for r in last if r["step"] == step},
                  "minutes", next(r["minutes"] for r in last if r["step"] == step))
    print(f"wrote {RESULTS / 'generator_curves.csv'} and generator_curves.png")


if __name__ == "__main__":
    main()
