"""Reading an nnU-Net v2 raw dataset: its dataset.json, its cases, which are real or synthetic, their
condition labels; and the checks a case must pass before it is written (``dataset`` writes them)."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nnunet_integration.manifest import CASE_CONDITION, COMMITTED, load_labels, load_manifest, synthetic_case_id
from nnunet_integration.names import case_part
from nnunet_integration.paths import FILE_ENDING, IMAGE_READER


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
    """Refuse datasets whose dataset.json would not read 3-channel RGB PNG cases (the layout of a
    dataset this tool creates). Writing checks a dataset's own format: ``formats.dataset_format``."""
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


def prepare_pair(name: str, image: Any, mask: Any, label_ids: Sequence[int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Check a pair before it is written: uint8 H x W x 3 image, H x W mask of ``label_ids`` (0/255
    masks become 0/1 where 255 is not a label id)."""
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
    if values <= {0, 1} or values <= set(label_ids):
        return image, mask.astype(np.uint8)
    if values <= {0, 255}:  # common PNG mask convention; nnU-Net needs consecutive labels 0/1
        return image, (mask == 255).astype(np.uint8)
    allowed = "0/1 (or 0/255)" if set(label_ids) <= {0, 1} else f"label ids {sorted(label_ids)}"
    raise ValueError(f"{name}: mask values must be {allowed}, found {sorted(values)[:10]}")


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")  # uint8: HxWx3 -> RGB, HxW -> L
    return buf.getvalue()



def committed_ids(dataset_dir: Path, batch: str) -> set[str]:
    """Case ids of one batch that are part of the dataset (committed) - what a rerun need not redo."""
    manifest = load_manifest(dataset_dir)
    if manifest is None:
        return set()
    return {synthetic_case_id(batch, name) for name, c in manifest.cases.items()
            if c.get("batch") == batch and c["state"] == COMMITTED}


def case_labels(dataset_dir: Path, names: Sequence[str], known: Sequence[str]) -> dict[str, str | None]:
    """The condition label of each case (None: not recorded and not to be told).

    A synthetic case's label is recorded in its manifest entry (an entry of an older version has
    none: its case id then starts with the label as a case-name part, matched against ``known``);
    a real case's label is recorded in ``pathar_aug_labels.json`` when it was written by this
    tool; otherwise a dataset whose ``known`` labels are one has that label.
    """
    manifest = load_manifest(dataset_dir)
    synthetic = manifest.cases if manifest is not None else {}
    real = load_labels(dataset_dir)
    by_part = {case_part(label): label for label in known}
    out: dict[str, str | None] = {}
    for name in names:
        entry = synthetic.get(name)
        if entry is not None:
            part = synthetic_case_id(entry["batch"], name).rsplit("-", 1)[0]
            out[name] = entry.get(CASE_CONDITION) or by_part.get(part, part)
        elif name in real:
            out[name] = real[name]
        else:
            out[name] = known[0] if len(known) == 1 else None
    return out
