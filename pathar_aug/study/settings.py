"""What defines a study: its groups (paper Table IV rows), its settings and schedules."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from nnunet_integration.names import safe_name
from pathar_aug.classical_augment import ClassicalAugment
from pathar_aug.filter_order import DEFAULT_ORDER, DEFAULT_OVERSAMPLE, UNRECORDED_ORDER, check_order
from pathar_aug.mask_classes import MaskClasses, resolve_classes

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo_data"
DEFAULT_VAL_FRACTION = 0.2
DATASET_NAME = "PatharBenchmark"
REAL_PREFIX = "r-"  # real tile cases: r-<label>-<source>-t<k>

KIND_REAL, KIND_GENERATED, KIND_RENDERED, KIND_CLASSICAL = "real", "generated", "rendered", "classical"
KIND_FILTERED = "filtered"  # generated, oversampled, the pairs the run's quality filter passes kept
KIND_TEXT = {KIND_GENERATED: "synthetic", KIND_RENDERED: "mask-conditioned", KIND_CLASSICAL: "classical aug.",
             KIND_FILTERED: "filtered synthetic"}
BATCH_TAG = {KIND_GENERATED: "gen", KIND_RENDERED: "ren", KIND_CLASSICAL: "cls", KIND_FILTERED: "fil"}
KEY_LETTER = {KIND_GENERATED: "g", KIND_RENDERED: "m", KIND_CLASSICAL: "c", KIND_FILTERED: "f"}
EXTRA_KINDS = (KIND_RENDERED, KIND_CLASSICAL, KIND_FILTERED)  # the rows beside real + synthetic, table order
DEFAULT_EXTRA_KINDS = (KIND_RENDERED, KIND_CLASSICAL)
EXTRA_ROWS = ("largest", "all", "none")
METRICS = ("dice", "aji", "pq")  # per validation tile: semantic Dice, aggregated Jaccard, panoptic quality
CLASS_DICE = "dice_"  # multi-class runs: "dice_<class>", the Dice of each foreground class beside METRICS
AVERAGE = "average"  # the summary row over all labels
SCHEDULES = ("cpu", "full")
# Whose empty / full mask shares cap the filtered row: the generator's training patches ("run", as
# `synthesize` does) or the study's own real training tiles of that seed and label ("study"). The
# study picks its real tiles nuclei first, so with "run" its synthetic tiles hold empty masks (about
# 40 % for DSB2018 brightfield) where its real ones hold none.
FILTER_EMPTY = ("run", "study")
# Settings that change only the synthetic rows (the generator, its sampling and filtering, which
# rows run): two studies equal in all others train group I on the same cases the same way, so their
# folds pair (benchmarks.dice_compare) and one may take its group I from the other (--reference).
GENERATOR_ONLY = frozenset({"model", "preset", "synthetic", "synthetic_only", "extra_rows", "extra_kinds",
                            "unfiltered", "filter_oversample", "filter_order", "filter_empty", "guidance",
                            "temperature", "top_k", "top_p", "sample_batch", "classical"})


# The CPU schedule's batch: nnU-Net's planner sizes the batch for a GPU (for 128 px tiles and a few
# thousand cases it plans dozens); on 2 cores an iteration then takes many seconds. 8 is what the
# learning curve behind cpu_schedule was measured with.
CPU_MAX_BATCH = 8
CPU_UNET_FEATURES, CPU_UNET_MAX_FEATURES = 16, 512


def cpu_schedule(epochs: int | None = None, iterations: int | None = None):
    """The CPU schedule, sized to convergence: 40 epochs x 20 iterations of batch 8 with the CPU
    U-Net (16..512 features). On DSB2018 at 30 real 128 px tiles per label, group I's validation
    Dice at 25 / 50 / 75 / 100 % of it was 0.787 / 0.829 / 0.845 / 0.847
    (benchmarks/results/dice_scaling_schedule_f16_curve.csv): the last two within 0.01. About 1 s
    per iteration on 2 cores (one torch thread, one augmentation worker), 13 minutes per fold.
    1 validation iteration per epoch (nnU-Net's pseudo Dice is not used here)."""
    from nnunet_integration.trainer import Schedule

    return Schedule(epochs=epochs or 40, iterations_per_epoch=iterations or 20, val_iterations_per_epoch=1,
                    save_every=5)


def full_schedule(epochs: int | None = None, iterations: int | None = None):
    """nnU-Net's standard schedule (1000 epochs x 250 iterations, 50 validation iterations), for GPUs."""
    from nnunet_integration.trainer import Schedule

    return Schedule(epochs=epochs or 1000, iterations_per_epoch=iterations or 250, val_iterations_per_epoch=50,
                    save_every=50)



def case_part(text: str) -> str:
    """A label or source name as part of a study case name (no '_': it separates a name's parts)."""
    return safe_name(text, keep="-")


def stable_seed(*parts) -> int:
    """A stable 31-bit seed from any parts (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def class_metrics(classes: MaskClasses) -> tuple[str, ...]:
    """The study's per-tile metrics: ``METRICS`` (Dice of the foreground against the background, AJI,
    PQ), and with K > 2 classes the Dice of each foreground class, ``dice_<class name>``."""
    if classes.binary:
        return METRICS
    names = tuple(f"{CLASS_DICE}{name}" for name in classes.names[1:])
    # the report's columns add _sd, _delta_vs_I ... to each metric: "sd" or "per_seed" as a class
    # name would collide with the Dice's own dice_sd / dice_per_seed columns
    taken = {"dice_sd", "dice_per_seed"}
    clash = [n for n in names if n in taken or n in METRICS]
    if clash:
        raise ValueError(f"the class name {clash[0][len(CLASS_DICE):]!r} would make the report column {clash[0]!r}, "
                         "which the report uses already; rename the class")
    return METRICS + names


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



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
                extra_rows: str = "largest", extra_kinds: Sequence[str] = DEFAULT_EXTRA_KINDS,
                unfiltered: bool = True) -> list[Group]:
    """The groups, in table order: real only (if 0 is among ``synthetic``), synthetic only
    (``synthetic_only`` generated tiles and no real ones; default the smallest positive count,
    0 = no such row), real + each positive count (unfiltered generated pairs; left out when not
    ``unfiltered``, to judge only the extra rows), then one row of each of ``extra_kinds``
    (mask-conditioned, classical, quality-filtered) at the largest count (``extra_rows='largest'``),
    at every positive count (``'all'``) or none."""
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
    if unfiltered:
        rows += [(real, s, KIND_GENERATED) for s in positive]
    extra_at = {"largest": positive[-1:], "all": positive, "none": []}[extra_rows]
    unknown = [k for k in extra_kinds if k not in EXTRA_KINDS]
    if unknown:
        raise ValueError(f"--extra-kinds must be among {', '.join(EXTRA_KINDS)}, got {unknown[0]!r}")
    for kind in EXTRA_KINDS:  # table order, whatever the order asked
        if kind in extra_kinds:
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
    extra_kinds: tuple[str, ...] = DEFAULT_EXTRA_KINDS  # rows beside real + synthetic (EXTRA_KINDS)
    unfiltered: bool = True  # the real + unfiltered synthetic rows (False: only the extra kinds' rows)
    filter_oversample: float = DEFAULT_OVERSAMPLE  # candidates drawn per kept pair in that row (as synthesize)
    filter_order: str = DEFAULT_ORDER  # which passing pairs that row keeps (filter_order.ORDERS)
    filter_empty: str = "run"  # whose empty / full shares cap that row (FILTER_EMPTY)
    val: int = 50  # validation tiles per label
    val_fraction: float | None = None  # of each label's source images; default: the model's, else 0.2
    split_seed: int | None = None  # default: the model's split seed, else 0
    seeds: int = 3  # repeats with other real subsets / synthetic draws / nnU-Net runs
    schedule: str = "cpu"
    epochs: int | None = None
    iterations: int | None = None
    batch_size: int | None = None  # nnU-Net batch; default: the planner's, capped at CPU_MAX_BATCH for "cpu"
    unet_features: int = CPU_UNET_FEATURES  # "cpu" schedule: features of the U-Net's first stage ...
    unet_max_features: int = CPU_UNET_MAX_FEATURES  # ... doubling per stage up to this
    curve: bool = True  # learning curve (Dice at 25/50/75/100 % of the schedule) of the curve groups
    instances: str | None = None  # instance masks for AJI/PQ (same stems); default: the masks' own ids
    bootstrap: int = 2000  # resamples of the paired bootstrap behind each delta's interval
    model: str | None = None
    preset: str = "cpu"  # generator preset when no model is given
    # sampling; None: the generator run's own defaults (RUN/sampling.json), else the paper's
    guidance: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    sample_batch: int = 32
    dataset_id: int = 980
    classical: ClassicalAugment = field(default_factory=ClassicalAugment)
    # mask classes (``mask_classes``): None and "classes" is the binary study of the paper; a
    # --model must make the same classes
    classes: dict[str, int] | None = None  # --classes: name -> id of the class ids in --masks
    mask_mode: str = "classes"  # "border": --masks holds instance masks (background / interior / border)

    def __post_init__(self) -> None:
        self.images, self.masks = str(Path(self.images).resolve()), str(Path(self.masks).resolve())
        self.labels_csv = str(Path(self.labels_csv).resolve()) if self.labels_csv else None
        self.model = str(Path(self.model).resolve()) if self.model else None
        self.instances = str(Path(self.instances).resolve()) if self.instances else None
        self.synthetic = tuple(sorted(set(int(s) for s in self.synthetic)))
        self.extra_kinds = tuple(self.extra_kinds)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("val", "seeds", "sample_batch", "unet_features", "unet_max_features", "bootstrap",
                     "filter_oversample"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "iterations", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        check_order(self.filter_order)
        if self.filter_empty not in FILTER_EMPTY:
            raise ValueError(f"--filter-empty must be one of {', '.join(FILTER_EMPTY)}, got {self.filter_empty!r}")
        if not 1 <= self.dataset_id <= 999:
            raise ValueError(f"dataset id must be 1-999, got {self.dataset_id}")
        if self.classes is not None:
            self.classes = MaskClasses.from_mapping(self.classes, "--classes").mapping()
        class_metrics(self.mask_classes)  # validates the classes, the mask mode and the class names
        self.groups  # validates

    @property
    def groups(self) -> list[Group]:
        return plan_groups(self.real, self.synthetic, self.synthetic_only, self.extra_rows, self.extra_kinds,
                           self.unfiltered)

    @property
    def mask_classes(self) -> MaskClasses:
        """The classes of the study's masks (binary unless --classes or --mask-mode border)."""
        text = MaskClasses.from_mapping(self.classes).describe() if self.classes is not None else None
        return resolve_classes(text, self.mask_mode)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Per-tile metrics of the report (``class_metrics``)."""
        return class_metrics(self.mask_classes)

    def nnunet_schedule(self):
        return (cpu_schedule if self.schedule == "cpu" else full_schedule)(self.epochs, self.iterations)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["synthetic"] = list(self.synthetic)
        data["extra_kinds"] = list(self.extra_kinds)
        data["classical"] = self.classical.to_json()
        # binary studies leave the mask options out: their settings.json stays as it was, so a
        # folder made before multi-class studies existed resumes
        if self.classes is None:
            del data["classes"]
        if self.mask_mode == "classes":
            del data["mask_mode"]
        if self.unfiltered:  # likewise: folders made before the option existed resume
            del data["unfiltered"]
        # the filtered row's options, left out where they mean nothing (no such row) or where they
        # hold the value of folders made before the options existed, so that those resume
        filtered = any(g.kind == KIND_FILTERED for g in self.groups)
        if self.filter_order == UNRECORDED_ORDER or not filtered:
            del data["filter_order"]
        if self.filter_empty == "run" or not filtered:
            del data["filter_empty"]
        return data

    def cpu_network(self) -> dict | bool:
        """The ``plans.cpu_plans`` options of the "cpu" schedule; False: nnU-Net's own plan."""
        if self.schedule != "cpu":
            return False
        return {"base_features": self.unet_features, "max_features": self.unet_max_features}

    @classmethod
    def from_json(cls, data: dict) -> "BenchmarkSettings":
        data = dict(data)
        data["classical"] = ClassicalAugment(**data.get("classical", {}))
        data["synthetic"] = tuple(data["synthetic"])
        data["extra_kinds"] = tuple(data.get("extra_kinds", DEFAULT_EXTRA_KINDS))
        data.setdefault("filter_order", UNRECORDED_ORDER)
        return cls(**data)
