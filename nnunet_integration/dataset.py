"""Writing synthetic image-mask pairs into an nnU-Net v2 raw dataset, safe against ``kill -9``.

Layout (what ``nnunetv2.imageio.natural_image_reader_writer.NaturalImage2DIO`` reads for 2D RGB):
``imagesTr/<case>_0000.png`` one 8-bit RGB file holding the 3 channels, ``labelsTr/<case>.png``
one 8-bit single-channel file with values 0 (background) and 1 (nucleus).

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

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

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
from nnunet_integration.manifest import (
    CASE_SCORES,
    COMMITTED,
    PENDING,
    SYNTHETIC_PREFIX,
    Manifest,
    ManifestError,
    case_files,
    load_manifest,
    save_manifest,
    settings_batch_tag,
    synthetic_case_name,
    check_batch_tag,
    json_safe,
)
from nnunet_integration.paths import FILE_ENDING, IMAGE_READER

Case = tuple[str, np.ndarray, np.ndarray]
# a case may carry a 4th element: its quality scores, recorded in the manifest (``CASE_SCORES``)
ScoredCase = tuple[str, np.ndarray, np.ndarray, Mapping[str, Any]]


class IncompatibleDatasetError(ValueError):
    """The dataset's dataset.json does not describe the files this tool writes."""


# ----------------------------------------------------------------------------- reading


def read_dataset_json(dataset_dir: Path) -> tuple[dict[str, Any], str]:
    """(parsed, exact text) of ``dataset_dir/dataset.json``."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {dataset_dir} an nnU-Net raw dataset?")
    text = path.read_text(encoding="utf-8")
    return json.loads(text), text


def list_cases(dataset_dir: Path, dataset_json: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every training case nnU-Net sees: ``{case: {"images": [...], "label": ...}}``, paths as written.

    Mirrors ``nnunetv2.utilities.utils.get_filenames_of_train_images_and_targets`` (the ``dataset``
    list if present, else the imagesTr scan of ``get_identifiers_from_splitted_dataset_folder``)
    without its 12-process pool.
    """
    dataset_dir = Path(dataset_dir)
    dj = dataset_json if dataset_json is not None else read_dataset_json(dataset_dir)[0]
    if "dataset" in dj:
        return {k: {"images": list(v["images"]), "label": v["label"]} for k, v in dj["dataset"].items()}
    ending = dj["file_ending"]
    images_dir = dataset_dir / "imagesTr"
    files = sorted(f for f in os.listdir(images_dir) if f.endswith(ending) and (images_dir / f).is_file())
    crop = len(ending) + 5  # nnU-Net strips "_XXXX<ending>"
    identifiers = sorted(set(f[:-crop] for f in files))
    cases = {}
    for ident in identifiers:
        pattern = re.compile(re.escape(ident) + r"_\d\d\d\d" + re.escape(ending))
        cases[ident] = {
            "images": [f"imagesTr/{f}" for f in files if pattern.fullmatch(f)],
            "label": f"labelsTr/{ident}{ending}",
        }
    return cases


def real_cases(dataset_dir: Path) -> list[str]:
    """Cases of the dataset that this tool did not add, sorted."""
    manifest = load_manifest(dataset_dir)
    synthetic = set(manifest.cases) if manifest else set()
    return sorted(c for c in list_cases(dataset_dir) if c not in synthetic)


def synthetic_cases(dataset_dir: Path) -> list[str]:
    """Synthetic cases that are part of the dataset now (committed), sorted."""
    manifest = load_manifest(dataset_dir)
    if manifest is None:
        return []
    listed = list_cases(dataset_dir)
    return sorted(c for c in manifest.names(COMMITTED) if c in listed)


# ----------------------------------------------------------------------------- checks


def check_compatible(dataset_json: Mapping[str, Any]) -> None:
    """Refuse datasets whose dataset.json would not read the 3-channel PNG cases written here."""
    problems = []
    if dataset_json.get("file_ending") != FILE_ENDING:
        problems.append(f"file_ending is {dataset_json.get('file_ending')!r}, cases are written as {FILE_ENDING!r}")
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, Mapping) or len(channels) != 3:
        n = len(channels) if isinstance(channels, Mapping) else "no"
        problems.append(f"channel_names has {n} entries, one RGB file gives 3 channels")
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or not all(isinstance(v, int) for v in labels.values()):
        problems.append("labels must map names to single integers (region labels are not supported)")
    elif not {0, 1} <= set(labels.values()):
        problems.append(f"labels {dict(labels)} lack background 0 and nucleus 1")
    reader = dataset_json.get("overwrite_image_reader_writer")
    if reader not in (None, "None", IMAGE_READER):
        problems.append(f"overwrite_image_reader_writer is {reader!r}; RGB PNGs need {IMAGE_READER}")
    if problems:
        raise IncompatibleDatasetError("dataset.json does not match the cases to write: " + "; ".join(problems))


def prepare_pair(name: str, image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"{name}: image must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}")
    if mask.ndim != 2 or mask.shape != image.shape[:2]:
        raise ValueError(f"{name}: mask must have shape {image.shape[:2]} (H, W), got {mask.shape}")
    if mask.dtype == bool:
        return image, mask.astype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"{name}: mask must be bool or integer, got {mask.dtype}")
    values = set(np.unique(mask).tolist())
    if values <= {0, 1}:
        return image, mask.astype(np.uint8)
    if values <= {0, 255}:  # common PNG mask convention; nnU-Net needs consecutive labels 0/1
        return image, (mask == 255).astype(np.uint8)
    raise ValueError(f"{name}: mask values must be 0/1 (or 0/255), found {sorted(values)[:10]}")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")  # uint8: HxWx3 -> RGB, HxW -> L
    return buf.getvalue()


# ----------------------------------------------------------------------------- state changes


def _with_listing(dataset_dir: Path, dj: dict[str, Any]) -> dict[str, Any]:
    """dataset.json content with an explicit ``dataset`` list of the current cases."""
    if "dataset" in dj:
        return dj
    out = dict(dj)
    out["dataset"] = list_cases(dataset_dir, dj)
    return out


def _write_listing(dataset_dir: Path, dj: dict[str, Any]) -> None:
    dj["numTraining"] = len(dj["dataset"])
    atomic_write_json(Path(dataset_dir) / "dataset.json", dj)


def _commit(dataset_dir: Path, dj: dict[str, Any], names: list[str]) -> None:
    """Make ``names`` part of the dataset: the single rename that turns them into cases."""
    fsync_dir(dataset_dir / "imagesTr")  # the links must be durable before the listing names them
    fsync_dir(dataset_dir / "labelsTr")
    for name in names:
        image, label = case_files(name)
        dj["dataset"][name] = {"images": [image], "label": label}
    _write_listing(dataset_dir, dj)


def _remove_case_files(dataset_dir: Path, name: str) -> int:
    removed = 0
    for rel in case_files(name):
        path = dataset_dir / rel
        removed += unlink_if_present(tmp_path_for(path)) + unlink_if_present(path)
    return removed


def _recover(dataset_dir: Path, manifest: Manifest, dj: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Settle cases left ``pending`` by an interrupted write: (finished, removed)."""
    listed = dj.get("dataset", {})
    finished, removed, to_commit = [], [], []
    for name in manifest.names(PENDING):
        files = [dataset_dir / rel for rel in case_files(name)]
        for f in files:
            unlink_if_present(tmp_path_for(f))
        if name in listed:  # killed after the dataset.json commit, before the manifest update
            manifest.cases[name]["state"] = COMMITTED
            finished.append(name)
        elif "dataset" in dj and all(f.is_file() for f in files):  # both files published completely
            to_commit.append(name)
        else:
            _remove_case_files(dataset_dir, name)
            removed.append(name)
    if to_commit:
        _commit(dataset_dir, dj, to_commit)
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
    progress: bool = False,
    total: int | None = None,
) -> WriteReport:
    """Add synthetic ``(case_id, image uint8 HxWx3, mask HxW)`` pairs to an nnU-Net raw dataset.

    A case may carry a fourth element, a dict of its quality scores, kept in its manifest entry.

    Files follow ``NaturalImage2DIO``'s 2D layout (see module docstring); each case is stored as
    ``pathar_<batch>_<case_id>``. ``settings`` (model, checkpoint, sampling ...) is recorded per
    batch; the default batch tag is a hash of it, so rerunning the same command resumes: cases it
    already committed are skipped. Real cases are never touched; a name that exists already is
    refused, and so is a dataset whose real cases use the reserved ``pathar_`` prefix (their names
    could be mistaken for synthetic ones). Cases are committed to dataset.json in chunks of
    ``commit_every`` (more for large datasets, at most 256); a case that fails validation stops
    the call before its chunk is written. Nothing is written if dataset.json is incompatible (file
    ending, 3 channels, labels 0/1). An interrupted call leaves ``pending`` leftovers that nnU-Net
    does not see; the next call (or ``recover``/``clean_synthetic``) settles them.
    """
    dataset_dir = Path(dataset_dir)
    settings = dict(settings or {})
    batch = check_batch_tag(batch) if batch is not None else settings_batch_tag(settings)
    if commit_every < 1:
        raise ValueError("commit_every must be >= 1")

    with exclusive_dir_lock(dataset_dir, "writing"):
        dj, text = read_dataset_json(dataset_dir)
        check_compatible(dj)
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
            _write_listing(dataset_dir, dj)
        report.recovered, report.removed_leftovers = _recover(dataset_dir, manifest, dj)
        known = set(dj["dataset"])

        bar = None
        if progress:
            from pathar_aug.training import progress_bar

            bar = progress_bar()
            bar.start()
            task = bar.add_task("writing cases", total=total, info="")
        try:
            seen: set[str] = set()
            staged: list[tuple[str, bytes, bytes, Mapping[str, Any] | None]] = []

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
                    for rel in case_files(name):
                        if (dataset_dir / rel).exists():
                            raise FileExistsError(f"{dataset_dir / rel} exists and is not ours; refusing to overwrite")
                    image, mask = prepare_pair(name, image, mask)
                    # only the encoded PNGs are kept until the commit, not the arrays
                    staged.append((name, png_bytes(image), png_bytes(mask), scores))
                    if len(staged) >= _chunk_size(commit_every, len(known)):
                        flush()
                if bar is not None:
                    bar.update(task, advance=1, info=f"{len(report.written) + len(staged)} new")
            flush()
        finally:
            if bar is not None:
                bar.stop()
        report.num_training = dj["numTraining"]
        return report


def _chunk_size(commit_every: int, num_cases: int) -> int:
    # each commit rewrites dataset.json and the manifest, which list every case: chunks grow with
    # the dataset (up to 256 cases) so that writing N cases costs O(N), not O(N^2)
    return max(commit_every, min(256, num_cases // 32))


def _write_chunk(
    dataset_dir: Path, manifest: Manifest, dj: dict[str, Any], batch: str,
    staged: list[tuple[str, bytes, bytes, Mapping[str, Any] | None]]
) -> None:
    for name, _, _, scores in staged:  # 1. registered before any of its files exists
        image, label = case_files(name)
        manifest.cases[name] = {"batch": batch, "state": PENDING, "image": image, "label": label}
        if scores is not None:
            manifest.cases[name][CASE_SCORES] = json_safe(scores)
    save_manifest(dataset_dir, manifest)
    for name, image_png, label_png, _ in staged:  # 2. label first: an image never lacks its label
        image, label = case_files(name)
        for rel, data in ((label, label_png), (image, image_png)):
            final = dataset_dir / rel
            publish_no_clobber(write_tmp(final, data), final)
    _commit(dataset_dir, dj, [s[0] for s in staged])  # 3. the commit point
    for name, *_ in staged:  # 4.
        manifest.cases[name]["state"] = COMMITTED
    save_manifest(dataset_dir, manifest)
