"""A run's own sampling defaults, chosen at the end of training from what its samples look like.

The paper's sampling (guidance 1.5, temperature 0.85, top-k 100, top-p 0.92) suits a prior trained
for 300 epochs. A prior trained on a CPU budget is less sure of itself, and truncating its
distribution drops the rare tokens that draw nuclei: most sampled masks come out empty (measured on
DSB2018 with 500 prior steps: 63-91 % empty against 0-12 % in the real tiles). So each run walks,
per label, a ladder of ever hotter settings (the paper's, a milder truncation, then plain sampling
at temperatures 1.0 to 1.4), sampling ``SAMPLES_PER_LABEL`` pairs at each, until the share of empty masks
falls to the label's real share (hotter settings empty fewer still). It judges each setting by
what the default pipeline writes: the run's quality filter picks from the pairs as `synthesize`
does (one in ``FILTER_OVERSAMPLE``), and the label keeps the setting whose kept pairs have the
empty share closest to the real one (ties, common since the filter's quota caps empty masks at the
real rate, and kept shares within the standard error of their difference: the sampled share, then
the cooler), among those keeping at least
``MIN_YIELD`` of the best setting's count. Why not the sampled share alone: hotter sampling draws
nuclei more often, but it also paints nuclei into the images of its empty masks, and the filter
drops such pairs. Measured on DSB2018: matching the sampled share sent brightfield (13 training
images) to temperature 1.25 (sampled gap 0.19 -> 0.09), and then only 3 % of its filtered pairs
were empty against 43 % of the real tiles. Without a filter (runs trained before it existed) the
sampled share decides. The setting most labels take is the run's setting for all (``chosen``);
the others are stored per label.

The result lands in RUN/sampling.json; `synthesize`, `demo` and `benchmark` use it unless told
otherwise (a value given on the command line applies to every label).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from pathar_aug.filter_order import DEFAULT_OVERSAMPLE
from pathar_aug.quality_filter import foreground_share, is_empty
from pathar_aug.sampler import SamplingConfig

SAMPLING_FILE = "sampling.json"  # in the run folder
SAMPLING_FIELDS = ("guidance", "temperature", "top_k", "top_p")
# per candidate. The filter keeps one in three, and the label's setting is ranked on those: at 64
# (21 kept) neighbouring temperatures were told apart by one or two pairs and the choice flipped
# between two runs whose decoders differed only for another label (README, "Adversarial steps for
# histology alone"); at 192 the kept share's standard error is about 0.06.
SAMPLES_PER_LABEL = {"tiny": 4, "cpu": 192, "paper": 192}

# the ladder, coolest first (the paper's setting: it wins ties)
CANDIDATES: tuple[dict, ...] = (
    {"guidance": 1.5, "temperature": 0.85, "top_k": 100, "top_p": 0.92},
    {"guidance": 1.5, "temperature": 0.95, "top_k": 0, "top_p": 0.98},
    *({"guidance": 1.5, "temperature": t, "top_k": 0, "top_p": 1.0} for t in (1.0, 1.1, 1.2, 1.25, 1.3, 1.4)),
)
FILTER_OVERSAMPLE = round(DEFAULT_OVERSAMPLE)  # as `synthesize` draws by default: the filter keeps one in three
MIN_YIELD = 0.5  # a setting whose filter keeps under half the best setting's pairs is not eligible
# the rule that made a sampling.json: a file made by another is chosen again at `train --resume`
SAMPLING_RULE = "per-label ladder, judged after the quality filter, ties within the standard error"


@dataclass
class SamplingChoice:
    """The chosen settings and, for every candidate drawn, per label: the sampled empty-mask share,
    and how many pairs the quality filter kept and their empty share."""

    chosen: dict
    real_empty_share: dict[str, float]
    measured: list[dict]  # {"setting", "empty_share", "kept", "kept_empty_share"}: {label: value}
    samples_per_label: int
    prior_step: int | None = None  # the prior it was chosen for: a prior trained on chooses again
    # the tokenizer it was chosen with (its image decoder trained on adversarially decides anew);
    # None in files written before: the tokenizer's own steps
    tokenizer_step: int | None = None
    per_label: dict[str, dict] = dataclasses.field(default_factory=dict)  # label -> its own setting
    rule: str = SAMPLING_RULE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def empty_share(masks: torch.Tensor | Sequence[np.ndarray]) -> float:
    """Share of masks that are empty by the quality filter's rule (under 0.2 % foreground)."""
    shares = [foreground_share(np.asarray(m)) for m in masks]
    return float(np.mean([is_empty(s) for s in shares])) if shares else 0.0


Pairs = tuple[torch.Tensor, torch.Tensor]  # images B x 3 x P x P, masks B x 1 x P x P


def choose_sampling(generate: Callable[[int, int, SamplingConfig], Pairs], labels: Sequence[str],
                    real_empty_share: Mapping[str, float], samples_per_label: int, batch_size: int = 32,
                    seed: int = 0, candidates: Sequence[dict] = CANDIDATES,
                    select: Callable[[str, torch.Tensor, torch.Tensor, int], list[int]] | None = None
                    ) -> SamplingChoice:
    """Walk the ladder of ``candidates`` per label on ``samples_per_label`` pairs each
    (``generate(label_index, n, config)`` returns n images and masks) until the sampled empty share
    falls to the real one. With ``select(label, images, masks, keep)`` (the quality filter: indices
    of at most ``keep`` pairs kept) each setting is judged by its kept pairs: the label keeps the
    setting whose kept empty share is closest to the real one (ties, also within the binomial
    standard error of two kept shares at the real share: the sampled share, then the cooler), among
    those keeping at least ``MIN_YIELD`` of the best count; without, by the sampled share. The
    setting most labels keep is the one for all (ties: the cooler)."""
    if samples_per_label < 1:
        raise ValueError(f"samples_per_label must be >= 1, got {samples_per_label}")
    keep = max(1, samples_per_label // FILTER_OVERSAMPLE)
    measured = [{"setting": dict(setting), "empty_share": {}, "kept": {}, "kept_empty_share": {}}
                for setting in candidates]
    per_label: dict[str, dict] = {}
    for li, label in enumerate(labels):
        real = real_empty_share[label]
        gaps: list[float] = []  # of the kept pairs (no filter: of the sampled ones)
        sampled_gaps: list[float] = []
        kept_counts: list[int] = []
        for setting, record in zip(candidates, measured):
            config = SamplingConfig(batch_size=batch_size, seed=seed + li, **setting)
            images, masks = generate(li, samples_per_label, config)
            share = record["empty_share"][label] = empty_share(masks)
            sampled_gaps.append(abs(share - real))
            if select is None:
                gaps.append(abs(share - real))
                kept_counts.append(len(masks))
            else:
                kept = select(label, images, masks, keep)
                record["kept"][label] = len(kept)
                kept_share = record["kept_empty_share"][label] = empty_share(masks[kept]) if kept else None
                gaps.append(abs(kept_share - real) if kept else 1.0)
                kept_counts.append(len(kept))
            if share <= real:
                break  # hotter settings draw nuclei more often still
        eligible = [i for i, n in enumerate(kept_counts) if n >= MIN_YIELD * max(kept_counts)]
        # the filter's quota makes many settings tie on the kept pairs: then the sampled share decides,
        # so that pairs written without the filter (--no-filter) come out right too. Kept shares closer
        # than the standard error of their difference tie as well (DSB2018 histology: 3 against 1 empty
        # pair of 64 kept sent it to the paper's setting, 21 % of its sampled masks empty, real 4 %)
        tolerance = 0.0 if select is None else (2 * real * (1 - real) / keep) ** 0.5
        closest = min(round(gaps[i], 9) for i in eligible)
        tied = [i for i in eligible if round(gaps[i], 9) <= closest + tolerance]
        best = min(tied, key=lambda i: (round(sampled_gaps[i], 9), i))
        per_label[label] = dict(candidates[best])
    taken = [candidates.index(setting) for setting in per_label.values()]
    common = min(set(taken), key=lambda i: (-taken.count(i), i)) if taken else 0
    return SamplingChoice(dict(candidates[common]), dict(real_empty_share),
                          [m for m in measured if m["empty_share"]], samples_per_label, per_label=per_label)


_SHORT = {"guidance": "cfg", "top_k": "top-k", "top_p": "top-p"}  # field names as the options spell them


def describe_sampling(setting: Mapping, label_names: Sequence[str] = ()) -> str:
    """"cfg 1.5, temperature 1.0, top-k 0, top-p 1.0", then each label's own fields ("; brightfield:
    temperature 1.2"); ``by_label`` keys are label names or indices into ``label_names``."""
    text = (f"cfg {setting['guidance']}, temperature {setting['temperature']}, top-k {setting['top_k']}, "
            f"top-p {setting['top_p']}")
    for key, own in (setting.get("by_label") or {}).items():
        name = label_names[int(key)] if str(key).isdigit() and int(key) < len(label_names) else key
        text += f"; {name}: " + ", ".join(f"{_SHORT.get(k, k)} {v}" for k, v in own.items())
    return text


def run_defaults(run_dir: str | Path) -> dict:
    """The run's chosen sampling setting (its sampling.json), else the paper's."""
    path = Path(run_dir) / SAMPLING_FILE
    if path.is_file():
        return dict(json.loads(path.read_text())["chosen"])
    return dict(CANDIDATES[0])


def label_defaults(run_dir: str | Path) -> dict[str, dict]:
    """The run's own setting per label (empty for runs chosen before per-label settings existed)."""
    path = Path(run_dir) / SAMPLING_FILE
    return dict(json.loads(path.read_text()).get("per_label", {})) if path.is_file() else {}


def resolve_sampling(run_dir: str | Path, **given: float | int | None) -> dict:
    """``SamplingConfig`` fields: guidance / temperature / top_k / top_p, each one given (not None)
    winning for every label, the rest from the run's defaults; ``by_label`` (label index -> fields)
    where a label's own default differs from the all-label one."""
    from pathar_aug.pipeline import RunInfo  # it imports this module

    def resolved(defaults: dict) -> dict:
        return {name: defaults[name] if given.get(name) is None else given[name] for name in SAMPLING_FIELDS}

    common = resolved(run_defaults(run_dir))
    own = label_defaults(run_dir)
    by_label = {}
    if own:
        for index, label in enumerate(RunInfo.load(run_dir).label_names):
            setting = resolved(own[label]) if label in own else common
            differs = {name: value for name, value in setting.items() if value != common[name]}
            if differs:
                by_label[index] = differs
    return {**common, "by_label": by_label}
