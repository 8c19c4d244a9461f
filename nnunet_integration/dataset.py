"""Writing image-mask pairs into an nnU-Net v2 raw dataset, safe against ``kill -9``: the one writer.

Every write into a dataset goes through this module under one lock (``atomic.exclusive_dir_lock``):
``write_real_cases`` (real pairs, before any synthetic one), ``write_cases`` (synthetic pairs, with
the manifest) and ``write_chunks`` (synthetic pairs made chunk by chunk, finished chunks skipped).
Reading and checks live in ``cases``.

Layout: the dataset's own (``formats.dataset_format``): its file ending and reader/writer, its
channels (one RGB PNG, or one file per channel), the pixel type, intensity range and geometry of its
real cases, its label ids (0 background and 1 nucleus for binary masks). A dataset this tool creates
holds ``imagesTr/<case>_0000.png`` (one 8-bit RGB file) and ``labelsTr/<case>.png``. Each synthetic
case's files are listed in its manifest entry.

Why dataset.json gets a ``dataset`` listing: nnU-Net counts the cases of a plain dataset by
scanning imagesTr and requires that count to equal ``numTraining``. Adding a file and changing
``numTraining`` are two separate steps, so a plain dataset is invalid between them. Once dataset.json
lists every case (nnU-Net's documented ``dataset`` key; nnU-Net then reads that list instead of
scanning), a case becomes part of the dataset only when the new dataset.json is renamed into place
- one atomic step, after its files are complete. The original dataset.json is kept in the manifest
and restored byte for byte by ``clean_synthetic``.

Write order per chunk of cases:
1. manifest: cases registered as ``pending`` (before any file exists),
2. label then image written to ``<file>.tmp``, flushed, and linked to their final names
   (a link never replaces an existing file),
3. dataset.json replaced (the commit point: the cases now count, numTraining updated),
4. manifest: cases marked ``committed``.
A kill at any point leaves a dataset nnU-Net accepts; the next call (or ``recover``) finishes
pending cases whose two files are complete and deletes the rest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from nnunet_integration.atomic import (
    atomic_write_json,
    exclusive_dir_lock,
    fsync_dir,
    publish_no_clobber,
    tmp_path_for,
    unlink_if_present,
    write_tmp,
)
from nnunet_integration.cases import (  # noqa: F401 - re-exported: the reading side of a dataset
    IncompatibleDatasetError,
    case_labels,
    check_compatible,
    committed_ids,
    list_cases,
    png_bytes,
    prepare_pair,
    read_dataset_json,
    real_cases,
    synthetic_cases,
)
from nnunet_integration.formats import (
    REAL_FIX,
    dataset_format,
    encode_case,
    mask_labels_fit,
    source_channels_fit,
)
from nnunet_integration.manifest import (
    CASE_CONDITION,
    CASE_SCORES,
    COMMITTED,
    PENDING,
    SYNTHETIC_PREFIX,
    Manifest,
    ManifestError,
    case_files,
    check_batch_tag,
    json_safe,
    load_manifest,
    save_labels,
    save_manifest,
    settings_batch_tag,
    synthetic_case_name,
)

Case = tuple[str, np.ndarray, np.ndarray]
# a case may carry a 4th element: its quality scores, recorded in the manifest (``CASE_SCORES``)
ScoredCase = tuple[str, np.ndarray, np.ndarray, Mapping[str, Any]]


# ----------------------------------------------------------------------------- state changes


def _with_listing(dataset_dir: Path, dj: dict[str, Any]) -> dict[str, Any]:
    """dataset.json content with an explicit ``dataset`` list of the current cases."""
    if "dataset" in dj:
        return dj
    out = dict(dj)
    out["dataset"] = list_cases(dataset_dir, dj)
    return out


def write_listing(dataset_dir: Path, dj: dict[str, Any]) -> None:
    dj["numTraining"] = len(dj["dataset"])
    atomic_write_json(Path(dataset_dir) / "dataset.json", dj)


def _listing_entry(files: Sequence[str]) -> dict[str, Any]:
    """dataset.json's ``dataset`` entry of a case from its files (images end in ``_XXXX<ending>``)."""
    label = next(f for f in files if f.startswith("labelsTr/") and not f.endswith(".json"))
    return {"images": [f for f in files if f.startswith("imagesTr/") and not f.endswith(".json")], "label": label}


def entry_files(name: str, entry: Mapping[str, Any] | None) -> list[str]:
    """The files of a synthetic case: listed in its manifest entry (entries of older versions name
    one image and one label in the RGB PNG layout)."""
    if entry is not None and "files" in entry:
        return list(entry["files"])
    return list(case_files(name))


def _commit(dataset_dir: Path, dj: dict[str, Any], names: list[str], manifest: Manifest) -> None:
    """Make ``names`` part of the dataset: the single rename that turns them into cases."""
    fsync_dir(dataset_dir / "imagesTr")  # the links must be durable before the listing names them
    fsync_dir(dataset_dir / "labelsTr")
    for name in names:
        dj["dataset"][name] = _listing_entry(entry_files(name, manifest.cases.get(name)))
    write_listing(dataset_dir, dj)


def remove_case_files(dataset_dir: Path, name: str, files: Sequence[str] | None = None) -> int:
    """Delete a case's files (``files``, default the RGB PNG layout) and their temporaries."""
    removed = 0
    for rel in (files if files is not None else case_files(name)):
        path = dataset_dir / rel
        removed += unlink_if_present(tmp_path_for(path)) + unlink_if_present(path)
    return removed


def _recover(dataset_dir: Path, manifest: Manifest, dj: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Settle cases left ``pending`` by an interrupted write: (finished, removed)."""
    listed = dj.get("dataset", {})
    finished, removed, to_commit = [], [], []
    for name in manifest.names(PENDING):
        rels = entry_files(name, manifest.cases[name])
        files = [dataset_dir / rel for rel in rels]
        for f in files:
            unlink_if_present(tmp_path_for(f))
        if name in listed:  # killed after the dataset.json commit, before the manifest update
            manifest.cases[name]["state"] = COMMITTED
            finished.append(name)
        elif "dataset" in dj and all(f.is_file() for f in files):  # both files published completely
            to_commit.append(name)
        else:
            remove_case_files(dataset_dir, name, rels)
            removed.append(name)
    if to_commit:
        _commit(dataset_dir, dj, to_commit, manifest)
        for name in to_commit:
            manifest.cases[name]["state"] = COMMITTED
        finished += to_commit
    for name in removed:  # files are gone, only now drop them from the record
        del manifest.cases[name]
    if finished or removed:
        save_manifest(dataset_dir, manifest)
    return finished, removed


def _check_consistent(dataset_dir: Path, manifest: Manifest, dj: dict[str, Any]) -> None:
    listed = dj.get("dataset", {})
    missing = [n for n in manifest.names(COMMITTED) if n not in listed]
    if missing:
        raise ManifestError(
            f"dataset.json no longer lists {len(missing)} synthetic case(s) of the manifest "
            f"(e.g. {missing[0]}); it was changed by hand - run clean_synthetic first"
        )
    if "dataset" not in json.loads(manifest.original_dataset_json) and "dataset" in dj:
        # a plain dataset was given a listing by us: real cases added to imagesTr since then
        # would be silently ignored by nnU-Net, so stop rather than train without them
        scanned = list_cases(dataset_dir, {k: v for k, v in dj.items() if k != "dataset"})
        unlisted = sorted(c for c in scanned if c not in listed and c not in manifest.cases)
        if unlisted:
            raise ManifestError(
                f"imagesTr holds {len(unlisted)} case(s) not in dataset.json (e.g. {unlisted[0]}), "
                "added after synthetic cases were written; run clean_synthetic, add them, then write again"
            )


@dataclass
class WriteReport:
    batch: str
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already committed by an earlier run
    recovered: list[str] = field(default_factory=list)  # pending cases of a killed run, finished
    removed_leftovers: list[str] = field(default_factory=list)  # pending cases of a killed run, deleted
    num_training: int = 0


def recover(dataset_dir: Path) -> WriteReport:
    """Finish or remove what an interrupted ``write_cases`` left; safe to call any time."""
    dataset_dir = Path(dataset_dir)
    with exclusive_dir_lock(dataset_dir, "writing"):
        manifest = load_manifest(dataset_dir)
        dj, _ = read_dataset_json(dataset_dir)
        report = WriteReport(batch="", num_training=dj["numTraining"])
        if manifest is not None:
            report.recovered, report.removed_leftovers = _recover(dataset_dir, manifest, dj)
            report.num_training = read_dataset_json(dataset_dir)[0]["numTraining"]
        return report


def write_cases(
    dataset_dir: Path,
    cases: Iterable[Case | ScoredCase],
    settings: Mapping[str, Any] | None = None,
    batch: str | None = None,
    commit_every: int = 32,
    labels: Mapping[str, str] | None = None,
    source_channels: int = 3,
    convert: str | None = None,
    mask_labels: Mapping[str, int] | None = None,
) -> WriteReport:
    """Add synthetic ``(case_id, image uint8 HxWx3, mask HxW)`` pairs to an nnU-Net raw dataset.

    A case may carry a fourth element, a dict of its quality scores, kept in its manifest entry;
    ``labels`` (case id -> condition label) are kept there too.

    Files follow the dataset's own format (see module docstring); each case is stored as
    ``pathar_<batch>_<case_id>``. ``source_channels`` says what the images hold (1: gray, replicated
    over R, G, B; 2: the first two channels; 3: RGB); it must match the dataset's channel count
    unless ``convert`` ('gray' or 'rgb') asks for a conversion. ``mask_labels`` (name -> id), where
    given, are the masks' classes and must be the dataset's (``formats.mask_labels_fit``); masks hold
    label ids of the dataset. ``settings`` (model, checkpoint, sampling ...) is recorded per
    batch; the default batch tag is a hash of it, so rerunning the same command resumes: cases it
    already committed are skipped. Real cases are never touched; a name that exists already is
    refused, and so is a dataset whose real cases use the reserved ``pathar_`` prefix (their names
    could be mistaken for synthetic ones). Cases are committed to dataset.json in chunks of
    ``commit_every`` (more for large datasets, at most 256); a case that fails validation stops
    the call before its chunk is written. Nothing is written if dataset.json is incompatible (file
    ending without a 2D reader/writer, channels that do not fit, labels without 0/1). An interrupted call leaves ``pending`` leftovers that nnU-Net
    does not see; the next call (or ``recover``/``clean_synthetic``) settles them.
    """
    dataset_dir = Path(dataset_dir)
    settings = dict(settings or {})
    batch = check_batch_tag(batch) if batch is not None else settings_batch_tag(settings)
    if commit_every < 1:
        raise ValueError("commit_every must be >= 1")

    with exclusive_dir_lock(dataset_dir, "writing"):
        dj, text = read_dataset_json(dataset_dir)
        fmt = dataset_format(dataset_dir, dj)
        source_channels_fit(fmt, source_channels, convert)
        if mask_labels is not None:
            mask_labels_fit(fmt, mask_labels)
        manifest = load_manifest(dataset_dir)
        if manifest is None:
            current = list_cases(dataset_dir, dj)
            if len(current) != dj["numTraining"]:
                raise IncompatibleDatasetError(
                    f"dataset.json says numTraining={dj['numTraining']} but {len(current)} cases are "
                    "present; fix the dataset before adding synthetic cases"
                )
            reserved = [c for c in current if c.startswith(SYNTHETIC_PREFIX)]
            if reserved:
                raise IncompatibleDatasetError(
                    f"real case {reserved[0]!r} uses the prefix {SYNTHETIC_PREFIX!r} reserved for synthetic "
                    "cases; rename the real cases first"
                )
            # the original text is recorded before dataset.json is changed for the first time
            manifest = Manifest(original_dataset_json=text)
        else:
            _check_consistent(dataset_dir, manifest, dj)

        report = WriteReport(batch=batch)
        manifest.add_batch(batch, settings)
        save_manifest(dataset_dir, manifest)
        if "dataset" not in dj:
            # a listing must exist before the first synthetic file appears in imagesTr
            dj = _with_listing(dataset_dir, dj)
            write_listing(dataset_dir, dj)
        report.recovered, report.removed_leftovers = _recover(dataset_dir, manifest, dj)
        known = set(dj["dataset"])

        seen: set[str] = set()
        staged: list[_Staged] = []

        def flush() -> None:
            if staged:
                _write_chunk(dataset_dir, manifest, dj, batch, staged)
                report.written.extend(s[0] for s in staged)
                known.update(s[0] for s in staged)
                staged.clear()

        for case in cases:
            case_id, image, mask = case[:3]
            scores = case[3] if len(case) > 3 else None
            name = synthetic_case_name(batch, case_id)
            if name in seen:
                raise ValueError(f"case id {case_id!r} appears twice")
            seen.add(name)
            if manifest.cases.get(name, {}).get("state") == COMMITTED:
                report.skipped.append(name)
            elif name in known:
                raise FileExistsError(f"case {name} already exists in {dataset_dir} and is not synthetic")
            else:
                for rel in fmt.files(name):
                    if (dataset_dir / rel).exists():
                        raise FileExistsError(f"{dataset_dir / rel} exists and is not ours; refusing to overwrite")
                image, mask = prepare_pair(name, image, mask, tuple(fmt.labels.values()))
                # only the encoded files are kept until the commit, not the arrays
                label = labels.get(case_id) if labels is not None else None
                staged.append((name, encode_case(name, image, mask, fmt, convert), scores, label))
                if len(staged) >= _chunk_size(commit_every, len(known)):
                    flush()
        flush()
        report.num_training = dj["numTraining"]
        return report


def _chunk_size(commit_every: int, num_cases: int) -> int:
    # each commit rewrites dataset.json and the manifest, which list every case: chunks grow with
    # the dataset (up to 256 cases) so that writing N cases costs O(N), not O(N^2)
    return max(commit_every, min(256, num_cases // 32))


# a case ready to be written: (name, its files [(relative path, content)] in publishing order,
# scores or None, condition label or None)
_Staged = tuple[str, "list[tuple[str, bytes]]", "Mapping[str, Any] | None", "str | None"]


def _write_chunk(dataset_dir: Path, manifest: Manifest, dj: dict[str, Any], batch: str, staged: list[_Staged]) -> None:
    for name, files, scores, condition in staged:  # 1. registered before any of its files exists
        listing = _listing_entry([rel for rel, _ in files])
        manifest.cases[name] = {"batch": batch, "state": PENDING, "image": listing["images"][0],
                                "label": listing["label"], "files": [rel for rel, _ in files]}
        if condition is not None:
            manifest.cases[name][CASE_CONDITION] = condition
        if scores is not None:
            manifest.cases[name][CASE_SCORES] = json_safe(scores)
    save_manifest(dataset_dir, manifest)
    for _, files, *_ in staged:  # 2. label first: an image never lacks its label
        _publish_case(dataset_dir, files)
    _commit(dataset_dir, dj, [s[0] for s in staged], manifest)  # 3. the commit point
    for name, *_ in staged:  # 4.
        manifest.cases[name]["state"] = COMMITTED
    save_manifest(dataset_dir, manifest)


def _publish_case(dataset_dir: Path, files: Sequence[tuple[str, bytes]]) -> list[Path]:
    """A case's files in order (spacing files and label first, then images), each linked into place
    without replacing anything; returns their paths."""
    published = []
    for rel, data in files:
        final = dataset_dir / rel
        publish_no_clobber(write_tmp(final, data), final)
        published.append(final)
    return published


def write_chunks(
    dataset_dir: Path,
    chunks: Sequence[Sequence[str]],
    make_chunk: Callable[[int], Iterable[Case | ScoredCase]],
    settings: Mapping[str, Any],
    batch: str,
    commit_every: int = 32,
    labels: Mapping[str, str] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    on_start: Callable[[], None] | None = None,
    source_channels: int = 3,
    convert: str | None = None,
    mask_labels: Mapping[str, int] | None = None,
) -> WriteReport:
    """``write_cases`` for pairs made chunk by chunk: ``chunks`` lists each chunk's case ids and
    ``make_chunk(c)`` makes chunk ``c``'s cases. A chunk whose every case is already committed in
    ``batch`` is not made at all, so a rerun of a killed call only makes what is missing.
    ``on_chunk(n)`` is told the size of each chunk once it is done or skipped; ``on_start()`` is
    called once the dataset's lock is held, before the first chunk."""
    done = committed_ids(dataset_dir, batch)

    def cases() -> Iterable[Case | ScoredCase]:
        if on_start is not None:
            on_start()
        for c, ids in enumerate(chunks):
            if not all(i in done for i in ids):
                yield from make_chunk(c)
            if on_chunk is not None:
                on_chunk(len(ids))

    return write_cases(dataset_dir, cases(), settings=settings, batch=batch, commit_every=commit_every,
                       labels=labels, source_channels=source_channels, convert=convert, mask_labels=mask_labels)


class SyntheticCasesPresent(IncompatibleDatasetError):
    """Real cases cannot be added to a dataset that already holds synthetic ones."""

    def __init__(self, dataset_dir: Path, missing: list[str]):
        super().__init__(f"{dataset_dir} holds synthetic cases; real cases must be written before them")
        self.missing = missing


def write_real_cases(
    dataset_dir: Path,
    cases: Sequence[Case],
    labels: Mapping[str, str] | None = None,
    resume: bool = False,
    sources: Mapping[str, Any] | None = None,
    source_channels: int = 3,
    convert: str | None = None,
    mask_labels: Mapping[str, int] | None = None,
) -> list[str]:
    """Write real ``(name, image uint8 HxWx3, mask HxW)`` pairs as plain cases; returns the names written.

    Files follow the dataset's format, as in ``write_cases`` (``source_channels``, ``convert``: see
    there); masks hold label ids of the dataset (0/1, or 0/255, for a binary one). ``mask_labels``
    (name -> id), the classes of K > 2 class masks, must be the dataset's labels. Every pair is checked before a file is written, and no file is ever replaced: a case whose
    name or files exist already is an error (``sources``, name -> where the pair came from, is
    named in it). With ``resume`` the cases the dataset lists already are skipped, and the files
    of a case it does not list yet (left by a killed call) are written again. Real cases come
    before synthetic ones (``SyntheticCasesPresent`` otherwise). A failed call takes back the
    files it wrote; numTraining (and the ``dataset`` listing, when there is one) is updated in
    one rename of dataset.json at the end. ``labels`` (name -> condition label) are recorded in
    ``pathar_aug_labels.json``.
    """
    dataset_dir = Path(dataset_dir)
    sources = sources or {}
    with exclusive_dir_lock(dataset_dir, "writing"):
        dj, _ = read_dataset_json(dataset_dir)
        fmt = dataset_format(dataset_dir, dj)
        source_channels_fit(fmt, source_channels, convert)
        if mask_labels is not None:
            mask_labels_fit(fmt, mask_labels, "the real", REAL_FIX)
        listed = set(list_cases(dataset_dir, dj))
        todo = [c for c in cases if c[0] not in listed] if resume else list(cases)
        if todo or not resume:
            if load_manifest(dataset_dir) is not None:
                raise SyntheticCasesPresent(dataset_dir, [c[0] for c in todo])
            for name, *_ in todo:
                if name in listed or (not resume and any((dataset_dir / rel).exists() for rel in fmt.files(name))):
                    where = f"{sources[name]}: " if name in sources else ""
                    raise FileExistsError(f"{where}case '{name}' already exists in {dataset_dir}; nothing was written")
            label_ids = tuple(fmt.labels.values())
            prepared = [(name, encode_case(name, *prepare_pair(name, image, mask, label_ids), fmt, convert))
                        for name, image, mask in todo]
            published: list[Path] = []
            try:
                for name, files in prepared:
                    if resume:  # leftovers of a killed call: never listed, so never read
                        remove_case_files(dataset_dir, name, fmt.files(name))
                    published += _publish_case(dataset_dir, files)
            except BaseException:  # a full disk or a kill signal: take back what this call wrote
                for path in published:
                    unlink_if_present(path)
                for name, *_ in prepared:
                    for rel in fmt.files(name):
                        unlink_if_present(tmp_path_for(dataset_dir / rel))
                raise
            if "dataset" in dj:
                for name, *_ in prepared:
                    dj["dataset"][name] = _listing_entry(fmt.files(name))
            dj["numTraining"] = len(list_cases(dataset_dir, dj))
            atomic_write_json(dataset_dir / "dataset.json", dj)
        if labels:
            save_labels(dataset_dir, labels)
    return [c[0] for c in todo]
