"""Where nnU-Net datasets live: resolving ``--into`` (id, name or path) and nnU-Net's folder variables."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

from nnunet_integration.atomic import atomic_write_json

RAW_ENV, PREPROCESSED_ENV, RESULTS_ENV = "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"

# nnU-Net finds a dataset only by a folder called DatasetXXX_Name (3-digit id)
DATASET_NAME_RE = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_\-]*)$")
_NAME_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

# Per-image, per-channel z-score (nnU-Net's default for any channel name it does not recognise).
# Chosen over 'rgb_to_0_1' (fixed /255) because nuclei images differ strongly in brightness and
# stain from source to source (H&E vs fluorescence, scanner, and real vs synthetic); a per-image
# z-score removes those global shifts, and it is what nnU-Net's own RGB conversions use.
RGB_CHANNEL_NAMES = {"0": "R", "1": "G", "2": "B"}
RGB_CHANNEL_NAMES_0_1 = {"0": "rgb_to_0_1", "1": "rgb_to_0_1", "2": "rgb_to_0_1"}
NUCLEI_LABELS = {"background": 0, "nucleus": 1}
FILE_ENDING = ".png"  # lossless and read as RGB by NaturalImage2DIO ('.tiff' would go to Tiff3DIO)
IMAGE_READER = "NaturalImage2DIO"


class DatasetResolutionError(ValueError):
    """``--into`` cannot be turned into a usable nnU-Net raw dataset folder."""


def parse_dataset_name(name: str) -> tuple[int, str]:
    """``'Dataset501_Nuclei'`` -> ``(501, 'Nuclei')``; raises on anything nnU-Net would not find."""
    m = DATASET_NAME_RE.match(name)
    if not m:
        raise DatasetResolutionError(
            f"{name!r} is not an nnU-Net dataset name; expected DatasetXXX_Name with a 3-digit id, "
            "e.g. Dataset501_Nuclei"
        )
    return int(m.group(1)), m.group(2)


def raw_root(nnunet_raw: Path | str | None = None) -> Path:
    """The explicit raw folder, else ``$nnUNet_raw``; a clear error when neither is known."""
    if nnunet_raw is not None:
        return Path(nnunet_raw).expanduser()
    env = os.environ.get(RAW_ENV)
    if not env:
        raise DatasetResolutionError(
            f"${RAW_ENV} is not set: set it to nnU-Net's raw data folder, pass the raw folder "
            "explicitly, or give the dataset as a path"
        )
    return Path(env).expanduser()


def preprocessed_dir(dataset_dir: Path, nnunet_preprocessed: Path | str | None = None) -> Path | None:
    """``<nnUNet_preprocessed>/<DatasetXXX_Name>`` (explicit root, else the env var), or None if unknown."""
    root = nnunet_preprocessed if nnunet_preprocessed is not None else os.environ.get(PREPROCESSED_ENV)
    if not root:
        return None
    return Path(root).expanduser() / Path(dataset_dir).name


def _names_with_id(dataset_id: int, roots: list[Path]) -> set[str]:
    prefix = f"Dataset{dataset_id:03d}_"
    found: set[str] = set()
    for root in roots:
        if root.is_dir():
            found.update(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    return found


def _id_roots(raw: Path) -> list[Path]:
    # nnU-Net resolves an id across raw, preprocessed and results; a clash in any of them breaks it
    roots = [raw]
    for env in (PREPROCESSED_ENV, RESULTS_ENV):
        if os.environ.get(env):
            roots.append(Path(os.environ[env]).expanduser())
    return roots


def _check_id_free(name: str, raw: Path) -> None:
    dataset_id, _ = parse_dataset_name(name)
    others = sorted(_names_with_id(dataset_id, _id_roots(raw)) - {name})
    if others:
        raise DatasetResolutionError(
            f"dataset id {dataset_id:03d} is already used by {', '.join(others)}; nnU-Net needs ids "
            f"to be unique across raw, preprocessed and results - pick another id or name"
        )


def make_dataset_json(name: str, normalization: str = "zscore", labels: Mapping[str, int] | None = None) -> dict:
    """dataset.json for one RGB PNG per case (3 channels) and a binary nucleus label (or ``labels``)."""
    if normalization not in ("zscore", "rgb_to_0_1"):
        raise ValueError("normalization must be 'zscore' or 'rgb_to_0_1'")
    return {
        "name": name,
        "description": "Nuclei image-mask pairs (RGB PNG); synthetic cases are listed in "
        "pathar_aug_manifest.json",
        "channel_names": dict(RGB_CHANNEL_NAMES if normalization == "zscore" else RGB_CHANNEL_NAMES_0_1),
        "labels": dict(labels or NUCLEI_LABELS),
        "numTraining": 0,
        "file_ending": FILE_ENDING,
        # pinned so that no other reader registered for '.png' can ever take over
        "overwrite_image_reader_writer": IMAGE_READER,
    }


def _create(dataset_dir: Path, mask_labels: Mapping[str, int] | None = None) -> Path:
    images, labels = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    for sub in (images, labels):
        if sub.is_dir() and any(sub.iterdir()):
            raise DatasetResolutionError(
                f"{dataset_dir} has files in {sub.name} but no dataset.json; it is not a dataset this "
                "tool created - write its dataset.json first or choose another folder"
            )
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    # dataset.json last: a folder without it is just an interrupted creation and is redone
    atomic_write_json(dataset_dir / "dataset.json", make_dataset_json(dataset_dir.name, labels=mask_labels))
    return dataset_dir


def _finish(dataset_dir: Path, create: bool, raw: Path | None, what: str,
            labels: Mapping[str, int] | None = None) -> Path:
    if (dataset_dir / "dataset.json").is_file():
        return dataset_dir
    if not create:
        exists = "has no dataset.json" if dataset_dir.is_dir() else "does not exist"
        raise DatasetResolutionError(f"{what} resolves to {dataset_dir}, which {exists}; check the name "
                                     "(`pathar-aug import` or `synthesize` create new datasets)")
    _check_id_free(dataset_dir.name, raw if raw is not None else dataset_dir.parent)
    return _create(dataset_dir, labels)


def resolve_dataset(
    into: str | int | Path,
    nnunet_raw: Path | str | None = None,
    create: bool = False,
    default_name: str = "PatharAug",
    labels: Mapping[str, int] | None = None,
) -> Path:
    """Turn a dataset id (``501``), name (``Dataset501_Nuclei``) or path into a raw dataset folder.

    Ids and names resolve inside ``nnunet_raw`` (default ``$nnUNet_raw``); anything containing a
    path separator or starting with ``.``/``~`` (or a ``Path``) is a path, whose last part must be a
    ``DatasetXXX_Name``. With ``create=True`` a missing dataset is made (imagesTr, labelsTr and an
    RGB-PNG dataset.json, with ``labels``, default background 0 / nucleus 1); a new id gets the
    name ``DatasetXXX_<default_name>``.
    """
    if isinstance(into, Path) or (isinstance(into, str) and _looks_like_path(into)):
        dataset_dir = Path(into).expanduser().absolute()
        parse_dataset_name(dataset_dir.name)
        return _finish(dataset_dir, create, None, f"path {str(into)!r}", labels)

    text = str(into).strip()
    if re.fullmatch(r"\d+", text):
        dataset_id = int(text)
        if not 1 <= dataset_id <= 999:
            raise DatasetResolutionError(f"dataset id {text!r} is out of range; nnU-Net ids are 1-999")
        root = raw_root(nnunet_raw)
        matches = sorted(_names_with_id(dataset_id, [root]))
        if len(matches) > 1:
            raise DatasetResolutionError(
                f"dataset id {dataset_id:03d} matches several folders in {root}: {', '.join(matches)}"
            )
        if matches:
            return _finish(root / matches[0], create, root, f"dataset id {dataset_id:03d}", labels)
        if not create:
            raise DatasetResolutionError(
                f"no dataset with id {dataset_id:03d} in {root}; check the id "
                "(`pathar-aug import` or `synthesize` create new datasets)"
            )
        if not _NAME_PART_RE.match(default_name):
            raise DatasetResolutionError(f"default_name {default_name!r} may only hold letters, digits, _ and -")
        return _finish(root / f"Dataset{dataset_id:03d}_{default_name}", True, root, "new dataset", labels)

    if text.startswith("Dataset"):
        parse_dataset_name(text)
        root = raw_root(nnunet_raw)
        dataset_dir = root / text
        if not dataset_dir.is_dir():
            # a name whose id another dataset already uses is an error even without create
            _check_id_free(text, root)
        return _finish(dataset_dir, create, root, f"dataset {text}", labels)

    raise DatasetResolutionError(
        f"cannot read {str(into)!r} as a dataset: give an id (e.g. 501), a name (e.g. "
        "Dataset501_Nuclei) or a path (e.g. ./Dataset501_Nuclei)"
    )


def _looks_like_path(text: str) -> bool:
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    return any(s in text for s in seps) or text.startswith((".", "~"))


@contextlib.contextmanager
def nnunet_env(
    raw: Path | str | None = None,
    preprocessed: Path | str | None = None,
    results: Path | str | None = None,
) -> Iterator[None]:
    """Temporarily point nnU-Net's folder variables elsewhere (nnunetv2 2.8 reads them when used)."""
    saved = {k: os.environ.get(k) for k in (RAW_ENV, PREPROCESSED_ENV, RESULTS_ENV)}
    try:
        for key, value in ((RAW_ENV, raw), (PREPROCESSED_ENV, preprocessed), (RESULTS_ENV, results)):
            if value is not None:
                os.environ[key] = str(value)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
