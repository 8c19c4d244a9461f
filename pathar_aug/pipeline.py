"""One run folder from a user's folders to a trained generator, and generation from it.

    runs/NAME/
      run.json                  settings, data summary, label names (written when the data is cached;
                                run_pending.json holds the settings until then)
      data/patches.pt           train / held-out patches (split by source image)
      tokenizer/                tokenizer.pt, tokenizer_loss.csv, tokenizer_preview.png
      tokens/                   train_tokens.pt (x8 dihedral views), heldout_tokens.pt
      prior/                    prior.pt, prior_loss.csv, held-out NLL
      samples_preview.png       one row of generated pairs per label
      filter/                   segmenter.pt, filter.json: the quality filter `synthesize` applies

Every stage checks whether its output is complete and skips it, so an interrupted run resumes
where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pathar_aug import distributed
from pathar_aug.adversarial_decoder import judged_label_ids
from pathar_aug.config import from_dict, from_preset, save_json, to_dict
from pathar_aug.ingest import (
    Sample,
    gray_labels,
    image_channels,
    load_dataset_pairs,
    load_pairs,
)
from pathar_aug.mask_classes import BINARY, MaskClasses, class_samples, resolve_classes
from pathar_aug.patches import PatchSet, make_patches, split_by_image
from pathar_aug.prior import PRIOR_PRESETS, PriorConfig
from pathar_aug.reporter import Log, Reporter, reporter_for
from pathar_aug.sampler import SamplingConfig
from pathar_aug.tokenizer import TOKENIZER_PRESETS, TokenizerConfig
from pathar_aug.train_prior import train_prior
from pathar_aug.train_tokenizer import build_token_cache, load_tokenizer, train_tokenizer
from pathar_aug.training import load_checkpoint, save_checkpoint
from pathar_aug.validate import check_out_folder, check_run_settings

RUN_FILE = "run.json"
RUN_PENDING = "run_pending.json"  # settings of a run whose data stage has not finished yet
TOKENIZER_CKPT = Path("tokenizer") / "tokenizer.pt"
PRIOR_CKPT = Path("prior") / "prior.pt"
PATCHES_FILE = Path("data") / "patches.pt"


class RunError(ValueError):
    """A run folder that is missing, incomplete or inconsistent."""


@dataclass
class RunSettings:
    images: str
    masks: str
    labels_csv: str | None
    preset: str
    tokenizer: TokenizerConfig
    prior: PriorConfig
    val_fraction: float = 0.1
    seed: int = 0
    dataset: str | None = None  # an nnU-Net raw dataset read instead of images / masks folders
    init: str | None = None  # a finished run both stages start from (init_from)
    # with init: "auto" (frozen if it fits the new tiles), "finetune" or "freeze" its tokenizer; runs
    # made before "auto" existed have no such field and fine-tuned it
    init_tokenizer: str = "finetune"
    classes: dict[str, int] | None = None  # mask classes, name -> label id (None: runs of older versions, binary)
    mask_mode: str = "classes"  # "classes": mask values are label ids; "border": instance masks (mask_classes)

    @property
    def gray_labels(self) -> list[str] | None:
        """Labels whose every image was gray (runs of older versions: None, not recorded)."""
        return self.data.get("gray_labels")

    @property
    def mask_classes(self) -> MaskClasses:
        return MaskClasses.from_mapping(self.classes, "the run's classes") if self.classes else BINARY

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "tokenizer": to_dict(self.tokenizer), "prior": to_dict(self.prior)}

    @classmethod
    def from_json(cls, data: dict) -> "RunSettings":
        return cls(**{**data, "tokenizer": from_dict(TokenizerConfig, data["tokenizer"]),
                      "prior": from_dict(PriorConfig, data["prior"])})


@dataclass
class RunInfo:
    """What ``run.json`` says about a finished data stage: the settings and the data summary
    (``label_names``, ``heldout_sources``, image and patch counts)."""

    run_dir: Path
    settings: RunSettings
    data: dict

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunInfo":
        run_dir = Path(run_dir)
        path = run_dir / RUN_FILE
        if not path.exists():
            raise RunError(f"{run_dir} is not a pathar-aug run folder (no {RUN_FILE}); train one with `pathar-aug train`")
        raw = json.loads(path.read_text())
        return cls(run_dir, RunSettings.from_json(raw["settings"]), raw.get("data", {}))

    @classmethod
    def find(cls, run_dir: str | Path | None) -> "RunInfo | None":
        """The run's info, or None where there is no run.json (yet)."""
        return cls.load(run_dir) if run_dir is not None and (Path(run_dir) / RUN_FILE).exists() else None

    @property
    def label_names(self) -> list[str]:
        return self.data["label_names"]

    @property
    def image_channels(self) -> int:
        """What the generator's images hold: 1 gray, 2 channels, 3 RGB (runs of older versions: 3)."""
        return int(self.data.get("image_channels", 3))

    @property
    def gray_labels(self) -> list[str] | None:
        """Labels whose every image was gray (runs of older versions: None, not recorded)."""
        return self.data.get("gray_labels")

    @property
    def mask_classes(self) -> MaskClasses:
        return self.settings.mask_classes

    @property
    def heldout_sources(self) -> list[str]:
        return self.data.get("heldout_sources", [])

    def save(self) -> None:
        save_json({"settings": self.settings.to_json(), "data": self.data}, self.run_dir / RUN_FILE)


def make_settings(images: Path | None, masks: Path | None, labels_csv: Path | None, preset: str,
                  tokenizer_overrides: dict | None = None, prior_overrides: dict | None = None,
                  val_fraction: float = 0.1, seed: int = 0, dataset: Path | None = None,
                  init: str | Path | None = None, init_tokenizer: str = "auto", classes: str | None = None,
                  mask_mode: str = "classes") -> RunSettings:
    """A run's settings; ``dataset`` (an nnU-Net raw dataset folder) replaces ``images``/``masks``;
    ``init`` names a finished run both stages start from: a folder, or a shipped starting point
    (``dsb2018``, kept by name so that the run does not depend on where the package is installed).
    The mask classes come from the dataset's labels, ``classes`` (``name=id,...``) or ``mask_mode``
    'border' (``mask_classes.resolve_classes``); the tokenizer gets their number."""
    from pathar_aug import starting_points
    from pathar_aug.init_from import TOKENIZER_MODES

    dataset_labels = None
    if dataset is not None:
        from nnunet_integration.cases import read_dataset_json

        images, masks = Path(dataset) / "imagesTr", Path(dataset) / "labelsTr"
        dataset_labels = read_dataset_json(Path(dataset))[0].get("labels")
    if images is None or masks is None:
        raise ValueError("give --images and --masks, or --dataset")
    mask_classes = resolve_classes(classes, mask_mode, dataset_labels)
    if init_tokenizer not in TOKENIZER_MODES:
        raise ValueError(f"--init-tokenizer must be one of {', '.join(TOKENIZER_MODES)}, got {init_tokenizer!r}")
    if init is not None and not (starting_points.resolve(init) / RUN_FILE).is_file():
        raise RunError(f"--init {init}: not a finished pathar-aug run folder (no {RUN_FILE})")
    if init is not None and str(init) not in starting_points.available():
        init = Path(init).resolve()
    return RunSettings(
        dataset=str(Path(dataset).resolve()) if dataset is not None else None,
        images=str(Path(images).resolve()), masks=str(Path(masks).resolve()),
        labels_csv=str(Path(labels_csv).resolve()) if labels_csv else None, preset=preset,
        tokenizer=from_preset(TOKENIZER_PRESETS, preset, **{**(tokenizer_overrides or {}),
                                                              "num_classes": mask_classes.k}),
        prior=from_preset(PRIOR_PRESETS, preset, **(prior_overrides or {})),
        val_fraction=val_fraction, seed=seed, init=str(init) if init is not None else None,
        init_tokenizer=init_tokenizer, classes=mask_classes.mapping(), mask_mode=mask_mode,
    )


def checkpoint_done(path: Path, steps: int) -> bool:
    return path.exists() and int(load_checkpoint(path)["step"]) >= steps


def _stored_settings(path: Path) -> RunSettings:
    try:
        return RunSettings.from_json(json.loads(path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: cannot read the run's settings ({type(exc).__name__}: {exc}); "
                       "start the run again in a new --out") from None


# the options a resumed run may be given, and how each is found in its stored settings
_RESUME_OPTIONS = {
    "images": lambda s: s.images, "masks": lambda s: s.masks, "labels": lambda s: s.labels_csv,
    "preset": lambda s: s.preset, "tokenizer_steps": lambda s: s.tokenizer.steps,
    "adversarial_steps": lambda s: s.tokenizer.adversarial_steps,
    "adversarial_labels": lambda s: tuple(s.tokenizer.adversarial_labels),
    "appearance_partner": lambda s: s.tokenizer.appearance_partner,
    "batch_size": lambda s: s.tokenizer.batch_size if s.tokenizer.batch_size == s.prior.batch_size else None,
    "val_fraction": lambda s: s.val_fraction, "seed": lambda s: s.seed, "prior_steps": lambda s: s.prior.steps,
    "dataset": lambda s: s.dataset, "init": lambda s: s.init, "init_tokenizer": lambda s: s.init_tokenizer,
    "classes": lambda s: s.mask_classes.mapping(), "mask_mode": lambda s: s.mask_mode,
}


def load_run_samples(settings: RunSettings) -> list[Sample]:
    """The real pairs a run trains on: its nnU-Net dataset's real cases, else its folders; masks as
    the run's classes (``mask_classes.class_samples``)."""
    if settings.dataset is not None:
        samples = load_dataset_pairs(settings.dataset)
    else:
        samples = load_pairs(settings.images, settings.masks, settings.labels_csv,
                             keep_values=settings.mask_classes.keeps_values(settings.mask_mode))
    return class_samples(samples, settings.mask_classes, settings.mask_mode)


def _data_channels(settings: RunSettings, samples: list[Sample]) -> int:
    if settings.dataset is not None:
        from nnunet_integration.cases import read_dataset_json

        dj = read_dataset_json(Path(settings.dataset))[0]
        return len(dj.get("channel_names", dj.get("modality", {}))) or 3
    return image_channels(samples)


def apply_resume_options(run_dir: Path, stored: RunSettings, given: dict[str, Any],
                         log: Callable[[str], None] = print) -> RunSettings:
    """Check options given again with --resume against the run's stored settings.

    Equal values are fine; the prior may be given more steps (it continues from its checkpoint);
    anything else would silently be ignored, so it is an error naming the option.
    """
    from pathar_aug import starting_points

    for option, value in given.items():
        if option not in _RESUME_OPTIONS:
            raise RunError(f"--{option.replace('_', '-')} cannot be given with --resume")
        if value is None:
            continue
        if option in ("images", "masks", "labels", "dataset") or (
                option == "init" and str(value) not in starting_points.available()):
            value = str(Path(value).resolve())
        if hasattr(value, "value"):  # an Enum such as the preset
            value = value.value
        current = _RESUME_OPTIONS[option](stored)
        if value == current:
            continue
        flag = f"--{option.replace('_', '-')}"
        if option == "prior_steps" and stored.prior.epochs is None and isinstance(value, int) and value > current:
            log(f"resume: the prior trains on to {value} steps (was {current})")
            stored = dataclasses.replace(stored, prior=dataclasses.replace(stored.prior, steps=value))
            continue
        if option == "adversarial_steps" and isinstance(value, int) and value > current:
            log(f"resume: the image decoder trains on adversarially to {value} steps (was {current}); "
                "its tokens, and so the prior, stay as they are")
            stored = dataclasses.replace(stored, tokenizer=dataclasses.replace(stored.tokenizer, adversarial_steps=value))
            continue
        if option == "adversarial_labels" and not _adversarial_stage_begun(run_dir, stored):
            changed = dataclasses.replace(stored.tokenizer, adversarial_labels=value)
            if (run_dir / RUN_FILE).is_file():  # else checked once the data stage knows the labels
                judged_label_ids(changed, RunInfo.load(run_dir).label_names)  # an unknown name raises
            log(f"resume: the adversarial stage judges {', '.join(value) if value else 'every label'}'s tiles")
            stored = dataclasses.replace(stored, tokenizer=changed)
            continue
        if option == "prior_steps" and stored.prior.epochs is not None:
            why = f"this run's prior trains for {stored.prior.epochs} epochs, so {flag} does not apply"
        elif option == "adversarial_labels":
            why = (f"the image decoder's adversarial stage has begun with {current or 'every label'} and its "
                   "discriminator learnt from those tiles")
        elif option in ("prior_steps", "adversarial_steps"):
            why = f"{flag} can only grow on --resume (the run has {current})"
        else:
            why = f"the run has {current!r}; a resumed run keeps its settings (leave {flag} out)"
        raise RunError(f"{run_dir}: {flag} {value!r} differs from the run: {why}; "
                       "start a new run with another --out to change it")
    return stored


def _adversarial_stage_begun(run_dir: Path, stored: RunSettings) -> bool:
    """Whether the run's tokenizer checkpoint holds adversarial decoder steps."""
    return checkpoint_done(run_dir / TOKENIZER_CKPT, stored.tokenizer.steps + 1)


def prepare_run(run_dir: Path, settings: RunSettings | None, resume: bool, given: dict[str, Any] | None = None,
                log: Log | None = None, reporter: Reporter | None = None) -> RunSettings:
    """Create the run folder (or check a resumed one) and cache the patches. Input errors raise
    before anything is written.

    ``settings`` may be None with ``resume``: the run folder alone says how to go on. ``given``:
    options typed again with --resume, checked by ``apply_resume_options``.
    """
    reporter = reporter_for(reporter, log)
    run_dir = Path(run_dir)
    check_out_folder(run_dir)
    run_file, pending = run_dir / RUN_FILE, run_dir / RUN_PENDING
    if run_file.exists():
        if not resume:
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        stored = _stored_settings(run_file)
        if given:
            changed = apply_resume_options(run_dir, stored, given, reporter.log)
            if changed != stored:
                info = RunInfo.load(run_dir)
                info.settings = changed
                info.save()
            stored = changed
        return stored
    if pending.exists() and (resume or settings is None or _stored_settings(pending) == settings):
        # the data stage was interrupted: redo it with the settings saved when it began
        saved = _stored_settings(pending)
        settings = apply_resume_options(run_dir, saved, given, reporter.log) if given else saved
    elif run_dir.exists() and any(run_dir.iterdir()):
        leftovers_only = {p.name for p in run_dir.iterdir()} <= {"data"}  # a data stage killed by older versions
        if not (resume and leftovers_only and settings is not None):
            raise RunError(f"{run_dir} exists and is not a pathar-aug run folder (no {RUN_FILE}); choose another --out"
                           + (", or pass --images and --masks to start the interrupted run again"
                              if resume and leftovers_only else ""))
    elif settings is None:
        raise RunError(f"{run_dir} holds no run to resume; start one with --images and --masks (or --dataset)")
    check_run_settings(settings)
    samples = load_run_samples(settings)  # raises IngestError
    train, val = split_by_image(samples, settings.val_fraction, settings.seed)
    label_names = sorted({s.label for s in samples})
    judged_label_ids(settings.tokenizer, label_names)  # an unknown adversarial label raises before any write
    train_patches = make_patches(train, settings.tokenizer.patch_size, label_names)
    val_patches = make_patches(val, settings.tokenizer.patch_size, label_names) if val else None
    # everything is checked; the first write saves the settings, so that --resume alone can redo
    # an interrupted data stage
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    save_json({"settings": settings.to_json()}, pending)
    save_checkpoint(run_dir / PATCHES_FILE, train=train_patches, heldout=val_patches)  # temp + rename
    summary = {"label_names": label_names, "train_images": len(train), "heldout_images": len(val),
               "train_patches": len(train_patches), "heldout_patches": len(val_patches) if val_patches else 0,
               "heldout_sources": sorted({s.name for s in val}), "image_channels": _data_channels(settings, samples),
               "gray_labels": gray_labels(samples),
               "mask_classes": settings.mask_classes.mapping(), "mask_mode": settings.mask_mode}
    if settings.dataset is not None:
        from nnunet_integration.cases import read_dataset_json

        summary["mask_labels"] = read_dataset_json(Path(settings.dataset))[0].get("labels")
    RunInfo(run_dir, settings, summary).save()  # marks the run as created
    pending.unlink()
    return settings


def load_patches(run_dir: Path) -> tuple[PatchSet, PatchSet | None]:
    data = torch.load(run_dir / PATCHES_FILE, weights_only=False)
    return data["train"], data["heldout"]


def train_run(run_dir: str | Path, settings: RunSettings | None, device: torch.device, resume: bool = False,
              given: dict[str, Any] | None = None, reporter: Reporter | None = None, compile: bool = False) -> Path:
    """All stages: ingest, tokenizer, tokenize, prior, preview. Returns the run folder.

    With ``resume``, ``settings`` may be None (the run folder holds them) and ``given`` holds the
    options typed again, checked against the run (see ``apply_resume_options``).

    Under torchrun (``distributed``) every rank calls this: tokenizer and prior train on all ranks
    with DistributedDataParallel; rank 0 alone writes the run folder and runs the other stages,
    while the others wait (and leave once the prior is trained). ``compile``: torch.compile the
    networks for training.
    """
    main = distributed.is_main()
    reporter = reporter_for(reporter) if main else distributed.reporter_of(reporter)[0]
    log = reporter.log
    run_dir = Path(run_dir)
    if main:
        settings = prepare_run(run_dir, settings, resume, given, reporter=reporter)
    distributed.barrier()
    if not main:
        settings = RunInfo.load(run_dir).settings
    train_patches, heldout = load_patches(run_dir)
    log(f"[1/4] data: {len(train_patches)} training patches of {settings.tokenizer.patch_size} px, "
        f"labels {', '.join(train_patches.label_names)}")

    log("[2/4] tokenizer")
    tok_ckpt = train_tokenizer(train_patches, run_dir / "tokenizer", settings.tokenizer, device,
                               resume=True, seed=settings.seed, reporter=reporter, compile=compile,
                               init_from=settings.init, init_mode=settings.init_tokenizer)
    distributed.barrier()  # rank 0 has written the final checkpoint
    tokenizer = load_tokenizer(tok_ckpt, device) if main else None

    log("[3/4] tokenize (8 dihedral views per training patch)")
    tokens = run_dir / "tokens"
    tokens.mkdir(exist_ok=True)
    train_tokens, heldout_tokens = tokens / "train_tokens.pt", tokens / "heldout_tokens.pt"
    if main and not train_tokens.exists():
        build_token_cache(tokenizer, train_patches, train_tokens, device, dihedral_views=True)
    if main and heldout is not None and not heldout_tokens.exists():
        build_token_cache(tokenizer, heldout, heldout_tokens, device, dihedral_views=False)
    distributed.barrier()

    log("[4/4] prior")
    train_prior(train_tokens, run_dir / "prior", settings.prior, device, resume=True,
                heldout_tokens_path=heldout_tokens if heldout is not None else None, reporter=reporter,
                compile=compile, init_from=settings.init)
    if not main:  # the remaining stages are rank 0's alone
        return run_dir
    from pathar_aug.generator import load_generator, save_sample_preview  # it imports this module

    generator = load_generator(run_dir, device)
    save_sample_preview(generator, run_dir / "samples_preview.png", device)

    log("quality filter: a segmenter trained on the real training patches, for synthesize")
    train_filter_stage(run_dir, device, settings=settings, patches=(train_patches, heldout), reporter=reporter)
    log("sampling defaults (last stage): per label, the setting whose filtered pairs have the real share of empty masks")
    train_sampling_stage(run_dir, device, settings=settings, reporter=reporter)
    return run_dir


def train_sampling_stage(run_dir: str | Path, device: torch.device, settings: RunSettings | None = None,
                         reporter: Reporter | None = None) -> Path:
    """The run's own sampling defaults (``sampling_defaults``), skipped when chosen already; needs
    the prior and the filter's real statistics."""
    from pathar_aug.quality_filter import QualityFilter
    from pathar_aug.sampling_defaults import (SAMPLES_PER_LABEL, SAMPLING_FILE, SAMPLING_RULE, choose_sampling,
                                              describe_sampling)

    run_dir = Path(run_dir)
    path = run_dir / SAMPLING_FILE
    prior_step = int(load_checkpoint(run_dir / PRIOR_CKPT)["step"])
    tokenizer_step = int(load_checkpoint(run_dir / TOKENIZER_CKPT)["step"])
    settings = settings or RunInfo.load(run_dir).settings
    samples = SAMPLES_PER_LABEL.get(settings.preset, 32)
    if path.is_file():
        chosen = json.loads(path.read_text())
        if (chosen.get("prior_step") == prior_step and chosen.get("rule") == SAMPLING_RULE
                and chosen.get("samples_per_label") == samples
                and (chosen.get("tokenizer_step") or settings.tokenizer.steps) == tokenizer_step):
            return path  # chosen for this prior and image decoder by this rule, on as many samples
    from pathar_aug.generator import load_generator  # it imports this module

    generator = load_generator(run_dir, device)
    quality = QualityFilter.load(run_dir, device)
    real = {label: stats.empty_share for label, stats in quality.stats.items()}

    def pairs(label_index: int, n: int, config: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
        return generator.generate([label_index] * n, config, device)

    def select(label: str, images: torch.Tensor, masks: torch.Tensor, keep: int) -> list[int]:
        return list(quality.select(images, masks, label, keep=keep).kept)

    choice = choose_sampling(pairs, generator.label_names, real, samples, seed=settings.seed, select=select)
    choice.prior_step, choice.tokenizer_step = prior_step, tokenizer_step
    save_json(choice.to_json(), path)
    records = {label: next(m for m in choice.measured if m["setting"] == own) for label, own in choice.per_label.items()}
    reporter_for(reporter).log("  chosen per label: " + "; ".join(
        f"{label} {describe_sampling(own)}: empty masks {records[label]['empty_share'][label]:.0%} sampled, "
        f"{records[label]['kept_empty_share'][label] or 0:.0%} kept by the filter (real {real[label]:.0%})"
        for label, own in choice.per_label.items()))
    return path


def train_filter_stage(run_dir: str | Path, device: torch.device, settings: RunSettings | None = None,
                       patches: tuple[PatchSet, PatchSet | None] | None = None,
                       reporter: Reporter | None = None) -> Path:
    """The quality-filter stage (skipped when complete). Also adds the filter to a run trained before
    the stage existed: `pathar-aug train --out RUN --resume` reaches it with every other stage done."""
    from pathar_aug.quality_filter import FILTER_PRESETS, FilterConfig, train_filter  # imports the evaluation

    run_dir = Path(run_dir)
    if settings is None:
        settings = RunInfo.load(run_dir).settings
    train_patches, heldout = patches if patches is not None else load_patches(run_dir)
    config = FILTER_PRESETS.get(settings.preset, FilterConfig())
    return train_filter(run_dir, train_patches, heldout, config, settings.seed, device, reporter=reporter,
                        classes=settings.mask_classes)


def ensure_filter(run_dir: str | Path, device: torch.device, reporter: Reporter | None = None) -> None:
    """Train the run's quality filter unless it has one: runs trained before the filter stage get
    it once, into their run folder (what `pathar-aug train --out RUN --resume` also does)."""
    from pathar_aug.quality_filter import filter_complete

    if filter_complete(run_dir):
        return
    reporter_for(reporter).log(f"quality filter: {run_dir} was trained before the filter stage existed; training "
                               f"it now, once, into {Path(run_dir) / 'filter'}")
    try:
        train_filter_stage(run_dir, device, reporter=reporter)
    except OSError as exc:
        raise RunError(f"cannot add the quality filter to {run_dir} ({exc}); make the run folder writable "
                       "or pass --no-filter") from exc
