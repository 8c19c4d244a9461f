"""Two Dice studies side by side: one group of each, paired by seed and validation tile.

    python -m benchmarks.dice_compare dice_scaling:r30-f200 dice_scaling_gpu_partner:r30-f200 \
        --name dice_compare_gpu_partner

Each side is STUDY:GROUP_KEY: a study's JSON in benchmarks/results/ (``benchmarks.dice_scaling
--name STUDY``) and the key of one of its groups (``r30`` real only, ``r30-g200`` 200 generated,
``r30-f200`` 200 filtered). Two studies pair when they share the protocol (real tiles per seed,
validation tiles, nnU-Net schedule and seeds; checked) and differ only in the generator and the rows
they ran: then seed s of one and seed s of the other saw the same real tiles and the same nnU-Net
initialisation, and the difference B - A of each metric gets the studies' own 95 % paired bootstrap
interval over seeds and validation tiles (``pathar_aug.bootstrap``). When both studies ran group I
(``r30``), its B - A is printed too: the same training twice, so it measures how far two runs of
the protocol drift apart on their own (CPU nnU-Net is not bit-reproducible).

Writes benchmarks/results/NAME.json and NAME.md.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.common import RESULTS
from pathar_aug.bootstrap import paired_bootstrap
from pathar_aug.study.settings import GENERATOR_ONLY, METRICS

REFERENCE = "r30"


def load_study(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"no study {path}: run benchmarks.dice_scaling --name {name} first")
    return json.loads(path.read_text())


def check_pairable(a: dict, b: dict, names: tuple[str, str]) -> None:
    keys = (set(a["settings"]) | set(b["settings"])) - GENERATOR_ONLY
    differ = sorted(k for k in keys if a["settings"].get(k) != b["settings"].get(k))
    if differ:
        raise SystemExit(f"{names[0]} and {names[1]} differ in {', '.join(differ)}: their folds do not pair")
    if any(validation_cases(a, label) != validation_cases(b, label) for label in a["validation"]):
        raise SystemExit(f"{names[0]} and {names[1]} were validated on other tiles")


def validation_cases(study: dict, label: str) -> list[str]:
    """The validation cases of ``label``: listed by newer reports, else found by their source image
    (case names hold it: r-<label>-<image>-t<tile>)."""
    listed = study["validation"][label].get("cases")
    if listed:
        return list(listed)
    images = study["validation"][label]["images"]
    some_fold = next(iter(study["dice_per_case"].values()))
    cases = sorted(c for c in some_fold if any(f"-{image}-" in c for image in images))
    if len(cases) != study["validation"][label]["tiles"]:
        raise SystemExit(f"found {len(cases)} validation cases of {label}, the study lists {study['validation'][label]['tiles']}")
    return cases


def per_tile(study: dict, key: str, metric: str, label: str) -> dict[int, np.ndarray]:
    """seed -> the metric on each validation tile of ``label``, in one order for every study."""
    tiles = validation_cases(study, label)
    out = {}
    for fold, result in study["folds"].items():
        if result["group"]["key"] == key:
            values = study[f"{metric}_per_case"][fold]
            out[int(result["seed"])] = np.array([values[t] for t in tiles])
    return out


def compare(a: dict, b: dict, key_a: str, key_b: str, bootstrap: int) -> dict:
    """Per metric and label (and their average): A's and B's mean over the paired seeds, B - A and
    its interval."""
    labels = list(a["validation"])
    out: dict = {}
    for metric in METRICS:
        tiles = {lb: (per_tile(a, key_a, metric, lb), per_tile(b, key_b, metric, lb)) for lb in labels}
        seeds = sorted(set(tiles[labels[0]][0]) & set(tiles[labels[0]][1]))
        if not seeds:
            raise SystemExit(f"no seed finished in both {key_a} and {key_b}")
        out[metric] = {}
        for label in labels + ["average"]:
            chosen = labels if label == "average" else [label]
            diffs = [np.stack([tiles[lb][1][s] - tiles[lb][0][s] for s in seeds]) for lb in chosen]
            interval = paired_bootstrap(diffs, bootstrap, seed=0)
            out[metric][label] = {
                "a": float(np.mean([tiles[lb][0][s].mean() for lb in chosen for s in seeds])),
                "b": float(np.mean([tiles[lb][1][s].mean() for lb in chosen for s in seeds])),
                "b_minus_a": interval.mean, "low": interval.low, "high": interval.high, "seeds": seeds}
    return out


def shared_reference(a: dict, b: dict) -> bool:
    """Whether both studies' group I is one training: one took the other's folds (``--reference``) or
    both took them from a third study. Told by the fold checkpoints' signatures, seed by seed: a study
    that took its group I elsewhere while the other trained its own does not share it."""
    def signatures(study: dict) -> dict[int, tuple]:
        return {r["seed"]: tuple(r["checkpoint"]) for r in study["folds"].values()
                if r["group"]["key"] == REFERENCE and r.get("checkpoint")}
    sig_a, sig_b = signatures(a), signatures(b)
    seeds = sig_a.keys() & sig_b.keys()
    return bool(seeds) and all(sig_a[s] == sig_b[s] for s in seeds)


def markdown(sides: tuple[str, str], result: dict, reference: dict | None, shared: bool = False) -> str:
    labels = list(result["dice"])
    lines = [f"# {sides[1]} against {sides[0]}", "",
             "Each cell: B - A, the mean over seeds and validation tiles, with its 95 % paired bootstrap interval "
             "(seeds and tiles resampled); **bold** where it excludes 0. In brackets A and B.", "",
             "| Metric | Comparison | " + " | ".join(labels) + " |", "| --- | --- |" + " ---: |" * len(labels)]

    def cell(c: dict) -> str:
        text = f"{c['b_minus_a']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
        bold = c["low"] > 0 or c["high"] < 0
        return (f"**{text}**" if bold else text) + f" ({c['a']:.3f} → {c['b']:.3f})"

    rows = [("B - A", result)] + ([("group I again (drift)", reference)] if reference else [])
    for metric in METRICS:
        for name, figures in rows:
            lines.append(f"| {metric} | {name} | " + " | ".join(cell(figures[metric][lb]) for lb in labels) + " |")
    if shared:
        lines += ["", "Group I is shared: one study took the other's group I folds (`--reference`), so the "
                      "pairs differ only in the generator's rows."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="STUDY:GROUP_KEY, the reference (A)")
    ap.add_argument("b", help="STUDY:GROUP_KEY, the one judged against it (B)")
    ap.add_argument("--name", required=True, help="report name in benchmarks/results/")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    (name_a, key_a), (name_b, key_b) = (side.split(":", 1) for side in (args.a, args.b))
    a, b = load_study(name_a), load_study(name_b)
    check_pairable(a, b, (name_a, name_b))
    result = compare(a, b, key_a, key_b, args.bootstrap)
    has_reference = all(any(f["group"]["key"] == REFERENCE for f in s["folds"].values()) for s in (a, b))
    shared = shared_reference(a, b)
    reference = compare(a, b, REFERENCE, REFERENCE, args.bootstrap) if has_reference and not shared else None
    text = markdown((args.a, args.b), result, reference, shared)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(
        {"command": f"python -m benchmarks.dice_compare {args.a} {args.b} --name {args.name}",
         "a": args.a, "b": args.b, "b_minus_a": result, "group_I_drift": reference,
         "group_I_shared": shared}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
