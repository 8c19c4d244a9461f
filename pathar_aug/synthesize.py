"""Generate pairs with a trained run and write them into nnU-Net v2 raw datasets; import real folders."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from nnunet_integration.cases import IncompatibleDatasetError, committed_ids, read_dataset_json
from nnunet_integration.dataset import SyntheticCasesPresent, write_chunks, write_real_cases
from nnunet_integration.formats import (NATURAL, REAL_FIX, DatasetFormat, dataset_format, mask_labels_fit,
                                        source_channels_fit)
from nnunet_integration.manifest import SYNTHETIC_PREFIX, load_manifest, settings_batch_tag
from nnunet_integration.names import case_part
from nnunet_integration.paths import FILE_ENDING, DatasetResolutionError, preprocessed_dir, resolve_dataset
from nnunet_integration.splits import real_and_synthetic, update_splits
from pathar_aug import distributed
from pathar_aug.filter_order import DEFAULT_ORDER, UNRECORDED_ORDER, check_order
from pathar_aug.ingest import IngestError, Sample, load_pairs
from pathar_aug.generator import Generator, load_generator, masks_as_patches
from pathar_aug.pipeline import RunInfo, ensure_filter
from pathar_aug.reporter import Log, Reporter, reporter_for
from pathar_aug.sampler import SamplingConfig
from pathar_aug.validate import check_sampling

# Written into every batch's settings in the manifest. Sampling runs in float arithmetic whose
# summation order follows the number of CPU threads, so a rare token can flip between thread counts.
REPRODUCIBILITY = ("the same model, settings, seed, device and number of CPU threads give identical pairs; "
                   "another thread count can change a few pairs")
# Longest file name most filesystems allow, and what nnU-Net's image name adds to a case name
# (the temporary name while writing is longer still): "<case>_0000.png.tmp".
NAME_MAX = 255
CASE_FILE_EXTRA = len("_0000.png.tmp")


@dataclass
class LabelAcceptance:
    """What the quality filter did for one label in one ``synthesize_into`` call."""

    label: str
    requested: int
    written: int = 0  # this batch's cases of the label now in the dataset (new or already present)
    candidates: int = 0  # pairs generated and scored in this call (chunks already written are not redone)
    passed: int = 0  # of them, at or above the agreement threshold
    kept: int = 0  # of them, written
    threshold: float | None = None

    @property
    def acceptance(self) -> float | None:
        """Kept / generated candidates (None: nothing was generated in this call)."""
        return self.kept / self.candidates if self.candidates else None

    @property
    def short(self) -> int:
        return max(0, self.requested - self.written)


@dataclass
class SynthesisResult:
    dataset: Path
    batch: str
    filter: str  # "on": pairs selected; "scores": scored only (mask-conditioned); "off"
    new: int = 0
    present: int = 0
    labels: dict[str, LabelAcceptance] = field(default_factory=dict)


def acceptance_lines(result: SynthesisResult) -> list[str]:
    """One line per label on what the filter kept, and what to do when a label fell short."""
    if result.filter == "off":
        return []
    lines = []
    for acc in result.labels.values():
        thr = f"agreement >= {acc.threshold:.2f}" if acc.threshold is not None else "agreement"
        if result.filter == "scores":
            lines.append(f"filter {acc.label}: scores recorded, nothing dropped (masks given); "
                         f"{acc.passed} of {acc.candidates} pairs reach {thr}")
            continue
        rate = f"{acc.acceptance:.0%}" if acc.acceptance is not None else "n/a"
        lines.append(f"filter {acc.label}: kept {acc.kept} of {acc.candidates} candidates (acceptance {rate}; "
                     f"{acc.passed} reached {thr}); {acc.written} of {acc.requested} requested pairs written")
        if acc.short:
            lines.append(f"  [yellow]{acc.label}: {acc.short} pair(s) short[/yellow]: too few candidates passed. "
                         "Rerun with a larger --oversample (at most 10) or a lower --min-agreement (each is a new "
                         "batch; `pathar-aug clean` removes this one first), or with --no-filter")
    return lines


def plan_labels(generator: Generator, n: int, label: str | None, per_label: bool) -> list[int]:
    """Label index of each pair to make: one label, n per label, or n spread over all labels."""
    if n <= 0:
        raise ValueError(f"--n must be a positive number of pairs, got {n}")
    if label is not None and per_label:
        raise ValueError("give either --label or --per-label, not both")
    if label is not None:
        return [generator.label_index(label)] * n
    k = len(generator.label_names)
    if per_label:
        return [li for li in range(k) for _ in range(n)]
    return [i % k for i in range(n)]


def _check_target(into: str, nnunet_raw: Path | None, source_channels: int = 3, channels: str | None = None,
                  mask_labels: Mapping[str, int] | None = None, imported: bool = False) -> None:
    """Fail before anything is written: a raw root must exist, an existing dataset must take the
    generator's images (its format, its channels, unless ``channels`` converts them) and its masks
    (``mask_labels``, the generator's classes, or with ``imported`` those of a user's masks: the
    dataset's labels; a new dataset is made with them)."""
    try:
        dataset = resolve_dataset(into, nnunet_raw, create=False)
    except DatasetResolutionError:
        # absent: resolve_dataset(create=True) makes an RGB PNG dataset, or raises before writing anything
        try:
            source_channels_fit(DatasetFormat(FILE_ENDING, NATURAL, 3, (3,)), source_channels, channels)
        except IncompatibleDatasetError as exc:
            raise IncompatibleDatasetError(f"{into}: a new dataset holds RGB PNGs: {exc} (or create a dataset.json "
                                           "for another channel count first)") from None
        return
    fmt = dataset_format(dataset, read_dataset_json(dataset)[0])
    source_channels_fit(fmt, source_channels, channels)
    if mask_labels is not None:
        if imported:  # the user's own masks, not a generator's: another way out
            mask_labels_fit(fmt, mask_labels, "the imported", REAL_FIX)
        else:
            mask_labels_fit(fmt, mask_labels)


def synthesize_into(
    model: Path, into: str, n: int, label: str | None = None, per_label: bool = False,
    masks_from: Path | None = None, sampling: SamplingConfig | None = None,
    device: torch.device = torch.device("cpu"), nnunet_raw: Path | None = None,
    nnunet_preprocessed: Path | None = None, quality_filter: bool = True, oversample: float | None = None,
    min_agreement: float | None = None, log: Log | None = None, reporter: Reporter | None = None,
    channels: str | None = None, filter_order: str = DEFAULT_ORDER,
) -> SynthesisResult:
    """Make pairs with a trained run and add them to a raw dataset; returns what was written.

    Pairs are made in chunks of ``sampling.batch_size``, chunk c seeded by (``sampling.seed``, c), so a
    rerun of the same command regenerates exactly the chunks whose cases are not committed yet, and
    completes the set.

    With ``quality_filter`` each chunk draws ``oversample`` candidates per requested pair (never
    more: the filter cannot loop), and keeps per label the best by image-mask agreement among those
    at or above the threshold, with empty and full masks at most at the real data's rate; a label
    whose candidates fall short gets fewer pairs (``SynthesisResult.labels`` says how many). Each
    kept pair's scores go into the manifest. Mask-conditioned pairs (``masks_from``) are scored and
    recorded, never dropped: their masks are the user's. ``filter_order="draw"`` keeps the passing
    pairs in the order drawn (the default), ``"agreement"`` the best first (``filter_order.ORDERS``). A run without a
    filter (trained before the stage existed) gets it trained here first, once, into its run folder.

    Cases take the dataset's own format (``nnunet_integration.formats``); a generator of gray images
    into a 3-channel dataset, or of RGB images into a 1-channel one, is refused unless ``channels``
    ('rgb' or 'gray') asks for the conversion.

    Under torchrun (``distributed``) every rank calls this with the same arguments: the chunks are
    shared out over the ranks and rank 0 alone writes the dataset (``sharded``); the pairs are the
    same as one process makes. The run folder (and ``masks_from``) must be readable on every
    machine; the dataset only on rank 0's. Only rank 0's result holds the counts.
    """
    from pathar_aug.filter_order import DEFAULT_OVERSAMPLE, MAX_OVERSAMPLE
    from pathar_aug.quality_filter import QualityFilter, quota

    main = distributed.is_main()
    reporter = reporter_for(reporter, log) if main else distributed.reporter_of(reporter)[0]
    if sampling is None:  # the run's own defaults (chosen at the end of training), else the paper's
        from pathar_aug.sampling_defaults import resolve_sampling

        sampling = SamplingConfig(**resolve_sampling(model))
    guidance, temperature, top_k, top_p = sampling.guidance, sampling.temperature, sampling.top_k, sampling.top_p
    seed, batch_size = sampling.seed, sampling.batch_size
    # every option is checked before anything is written (--n by plan_labels, below)
    check_sampling(guidance, temperature, top_k, top_p, batch_size, seed)
    oversample = DEFAULT_OVERSAMPLE if oversample is None else float(oversample)
    if quality_filter and not 1.0 <= oversample <= MAX_OVERSAMPLE:
        raise ValueError(f"--oversample must be between 1 and {MAX_OVERSAMPLE:g}, got {oversample:g}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"--min-agreement is a Dice in [0, 1], got {min_agreement:g}")
    check_order(filter_order)
    generator = load_generator(model, device)
    labels = plan_labels(generator, n, label, per_label)
    structure_masks = None
    if masks_from is not None:
        if label is None and len(generator.label_names) > 1:
            raise ValueError(f"--masks-from needs --label: the model knows {', '.join(generator.label_names)}")
        tiles, _ = masks_as_patches(masks_from, generator.patch_size, generator.classes, generator.mask_mode)
        structure_masks = tiles[:n]
        labels = [labels[0]] * len(structure_masks)
    source_channels = RunInfo.load(model).image_channels
    mask_labels = generator.classes.mapping()  # masks are generated as these label ids
    if main:
        _check_target(into, nnunet_raw, source_channels, channels, mask_labels)
    quality = None
    if quality_filter:
        if main:
            ensure_filter(model, device, reporter)
        distributed.barrier()
        quality = QualityFilter.load(model, device)
    dataset = resolve_dataset(into, nnunet_raw, create=True, labels=mask_labels) if main else None

    drawing = dict(guidance=guidance, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    settings = {"model": str(Path(model).resolve()), "mode": "mask-conditioned" if masks_from else "label-only",
                "masks_from": str(Path(masks_from).resolve()) if masks_from else None, "n": n, "label": label,
                "per_label": per_label, "batch_size": batch_size, **drawing}
    if sampling.by_label:  # absent without label settings: earlier batches keep their tags
        settings["sampling_by_label"] = {generator.label_names[li]: own for li, own in sampling.by_label.items()}
    if channels is not None:  # absent without a conversion: earlier batches keep their tags
        settings["channels"] = channels
    if quality is not None:  # absent without the filter: unfiltered batches keep their earlier tags
        settings["filter"] = {"segmenter": quality.fingerprint, "min_agreement": min_agreement,
                              "oversample": None if masks_from else oversample}
        if filter_order != UNRECORDED_ORDER and not masks_from:  # earlier batches keep their tags
            settings["filter"]["order"] = filter_order
    batch = settings_batch_tag(settings)
    mode = "off" if quality is None else ("scores" if structure_masks is not None else "on")
    result = SynthesisResult(dataset, batch, mode, labels={
        generator.label_names[li]: LabelAcceptance(generator.label_names[li], labels.count(li))
        for li in sorted(set(labels))})
    position: dict[int, int] = {}  # each pair's index within its label's sequence: the quotas follow it
    seen: dict[int, int] = {}
    for i, li in enumerate(labels):
        position[i] = seen.get(li, 0)
        seen[li] = position[i] + 1
    names = [f"{case_part(generator.label_names[li])}-{i:05d}" for i, li in enumerate(labels)]
    starts = range(0, len(labels), batch_size)

    def make_chunk(c: int) -> Iterator[tuple]:  # (name, image, mask) or, scored, (name, image, mask, scores)
        chunk = range(starts[c], min(starts[c] + batch_size, len(labels)))
        cfg = dataclasses.replace(sampling, batch_size=batch_size, seed=seed * 1_000_003 + c)
        chunk_labels = [labels[i] for i in chunk]
        if quality is not None and structure_masks is None:
            yield from filtered_chunk(chunk, cfg)
            return
        if structure_masks is None:
            images, masks = generator.generate(chunk_labels, cfg, device)
        else:
            masks = structure_masks[chunk.start:chunk.stop]
            images = generator.render_masks(masks, chunk_labels[0], cfg, device)
        scores: list = [None] * len(chunk)
        if quality is not None:  # mask-conditioned: score and record, drop nothing
            name = generator.label_names[chunk_labels[0]]
            threshold = quality.stats[name].threshold if min_agreement is None else min_agreement
            raw = quality.score(images, masks, threshold)
            scores = [s.to_json(threshold) for s in raw]
            acc = result.labels[name]
            acc.candidates += len(raw)
            acc.kept += len(raw)
            acc.passed += sum(s.passed for s in raw)
            acc.threshold = threshold
        for j, i in enumerate(chunk):
            case = (names[i], images[j].permute(1, 2, 0).numpy(), masks[j, 0].numpy())
            yield case if scores[j] is None else (*case, scores[j])

    def filtered_chunk(chunk: range, cfg: SamplingConfig) -> Iterator[tuple]:
        """Draw oversample x the chunk's pairs per label in one go; keep those of each label the filter passes."""
        by_label: dict[int, list[int]] = {}
        for i in chunk:
            by_label.setdefault(labels[i], []).append(i)
        drawn = {li: math.ceil(oversample * len(idx)) for li, idx in by_label.items()}
        images, masks = generator.generate([li for li in by_label for _ in range(drawn[li])], cfg, device)
        offset = 0
        for li, idx in by_label.items():
            name, part = generator.label_names[li], slice(offset, offset + drawn[li])
            offset += drawn[li]
            stats, first = quality.stats[name], position[idx[0]]
            selection = quality.select(images[part], masks[part], name, keep=len(idx),
                                       max_empty=quota(stats.empty_share, first, first + len(idx)),
                                       max_full=quota(stats.full_share, first, first + len(idx)),
                                       min_agreement=min_agreement, order=filter_order)
            acc = result.labels[name]
            acc.candidates += selection.candidates
            acc.passed += selection.passed
            acc.kept += len(selection.kept)
            acc.threshold = selection.threshold
            # the best pair takes the chunk's first name of the label; a short label leaves its last
            # names unused, so a rerun finds the chunk incomplete, redraws the same pairs and skips them
            for i, k in zip(idx, selection.kept):
                j = part.start + k
                yield (names[i], images[j].permute(1, 2, 0).numpy(), masks[j, 0].numpy(),
                       selection.scores[k].to_json(selection.threshold))

    chunks = [names[start:start + batch_size] for start in starts]
    if distributed.active():  # every rank makes its share of the chunks rank 0 has still to write
        from pathar_aug.sharded import ShardedChunks, counting, merger

        done = committed_ids(dataset, batch) if main else None
        todo = distributed.broadcast_object(
            [c for c, ids in enumerate(chunks) if not all(i in done for i in ids)] if main else None)
        shards = ShardedChunks(todo, counting(make_chunk, result.labels), merger(result.labels))
        if not main:
            shards.finish()
            return result
        make_chunk = shards.get  # rank 0 writes what the ranks made, in chunk order
    manifest = load_manifest(dataset)
    known = manifest.batches.get(batch) if manifest else None
    if known is None or "reproducibility" in known["settings"]:  # batches of older versions lack the note
        settings = {**settings, "reproducibility": REPRODUCIBILITY}  # recorded, not part of the batch tag
    with reporter.deferred_task("synthesize", total=len(labels)) as task:
        report = write_chunks(dataset, chunks, make_chunk,
                              settings=settings, batch=batch, commit_every=batch_size,
                              labels={name: generator.label_names[li] for name, li in zip(names, labels)},
                              on_chunk=task.advance, on_start=task.start,
                              source_channels=source_channels, convert=channels, mask_labels=mask_labels)
    if distributed.active():
        shards.finish()
    # chunks found complete were not even generated: count this batch's cases in the manifest
    committed = committed_ids(dataset, batch)
    result.new, result.present = len(report.written), len(committed) - len(report.written)
    for name, li in zip(names, labels):
        result.labels[generator.label_names[li]].written += name in committed
    reporter.log(f"{dataset}: {len(report.written)} new synthetic cases (batch {batch}), "
                 f"{len(report.skipped)} already present, numTraining {report.num_training}")
    n_real = len(real_and_synthetic(dataset)[0])
    if n_real < 5:
        reporter.log(f"splits: only {n_real} real case(s), too few for 5 real-only validation folds; "
                     "nnU-Net will make its own split")
    elif preprocessed_dir(dataset, nnunet_preprocessed) is not None:
        splits = update_splits(dataset, nnunet_preprocessed)
        reporter.log(f"splits: {splits} (every fold: real + synthetic training, real-only validation)")
    else:
        reporter.log("splits: $nnUNet_preprocessed unknown; run `pathar-aug synthesize` again with "
                     "--nnunet-preprocessed (or set it) so validation folds stay real-only")
    return result


def import_real(images: Path, masks: Path, into: str, labels_csv: Path | None = None,
                nnunet_raw: Path | None = None, log: Log | None = None, reporter: Reporter | None = None,
                classes: str | None = None, mask_mode: str = "classes") -> Path:
    """Write a user's real pairs into a raw dataset: all files are read and checked first, no existing
    case is overwritten, and dataset.json (numTraining) is replaced atomically at the end.

    Masks are binary by default; ``classes`` (``name=id,...``) or ``mask_mode`` 'border' (instance
    masks written as background / interior / border, as a border run's synthetic cases are) give
    K classes (``mask_classes.resolve_classes``), which a new dataset takes as its labels and an
    existing one must have already."""
    from pathar_aug.mask_classes import class_samples, resolve_classes

    reporter = reporter_for(reporter, log)
    mask_classes = resolve_classes(classes, mask_mode)
    samples = class_samples(load_pairs(images, masks, labels_csv, keep_values=mask_classes.keeps_values(mask_mode)),
                            mask_classes, mask_mode)
    names = case_names(samples)
    mask_labels = None if mask_classes.binary else mask_classes.mapping()  # binary: any dataset, as before
    _check_target(into, nnunet_raw, mask_labels=mask_labels, imported=True)
    dataset = resolve_dataset(into, nnunet_raw, create=True, labels=mask_labels)
    try:
        write_real_cases(dataset, [(names[s.name], s.image, s.mask if s.multiclass else s.binary_mask)
                                   for s in samples],
                         labels={names[s.name]: s.label for s in samples},  # condition labels, for evaluate
                         sources={names[s.name]: s.image_path for s in samples}, mask_labels=mask_labels)
    except SyntheticCasesPresent:
        raise IncompatibleDatasetError(f"{dataset} holds synthetic cases; run `pathar-aug clean` first, "
                                       "import, then synthesize again") from None
    label_counts = {l: sum(s.label == l for s in samples) for l in sorted({s.label for s in samples})}
    reporter.log(f"{dataset}: imported {len(samples)} real cases "
                 f"({', '.join(f'{k}: {v}' for k, v in label_counts.items())})"
                 + ("" if mask_labels is None else f", masks as the classes {mask_classes.describe()}"))
    return dataset


def case_names(samples: list[Sample]) -> dict[str, str]:
    """nnU-Net case name of each sample's stem; a name nnU-Net or the filesystem cannot take is an
    error naming the file, raised before anything is written."""
    names: dict[str, str] = {}
    owner: dict[str, Sample] = {}
    for s in samples:
        name = case_part(s.name)
        if name.startswith(SYNTHETIC_PREFIX):
            raise IngestError(f"{s.image_path}: its name starts with {SYNTHETIC_PREFIX!r}, which is reserved for "
                              "synthetic cases; rename the image and its mask")
        if len(name.encode()) + CASE_FILE_EXTRA > NAME_MAX:
            raise IngestError(f"{s.image_path}: file name too long for an nnU-Net case (at most "
                              f"{NAME_MAX - CASE_FILE_EXTRA} characters); rename the image and its mask")
        # case-insensitive filesystems (macOS, Windows) would merge names differing only in case
        other = owner.get(name.lower())
        if other is not None:
            raise IngestError(f"{s.image_path}: becomes case name '{name}', like {other.image_path} "
                              f"('{names[other.name]}'); rename one of them (case names keep letters, digits, '-' and '_')")
        owner[name.lower()] = s
        names[s.name] = name
    return names
