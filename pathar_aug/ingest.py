"""Read a user's image and mask folders into checked, normalised pairs.

Images: PNG / TIFF / JPEG, gray, RGB or RGBA, 8 or 16 bit -> RGB uint8.
Masks: binary (any nonzero value is foreground) -> {0, 1}; instance ids are kept as ids.
Labels: a ``name,label`` CSV, else the image's subfolder name, else one default label.
Every problem raises ``IngestError`` naming the offending file, before anything is written.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")  # JPEG is lossy: its masks would carry noise at edges
DEFAULT_LABEL = "nuclei"


class IngestError(ValueError):
    """Bad user input; the message names the file and says what to do."""


@dataclass
class Sample:
    """One source image with its mask and condition label."""

    name: str
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W int32: 0 background, 1 nucleus, or instance ids 1..K
    label: str
    image_path: Path
    mask_path: Path

    @property
    def binary_mask(self) -> np.ndarray:
        return (self.mask > 0).astype(np.uint8)


def _read_raw(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            im.load()  # forces the full decode now: truncated files fail here, not later
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return np.asarray(im)
    except Exception as exc:  # PIL and tifffile raise many types for broken files
        raise IngestError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from exc


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise IngestError(f"{path}: unsupported pixel type {arr.dtype}")
    # 16-bit and float microscopy rarely uses its full range: a robust per-image stretch keeps
    # dim fluorescence visible instead of mapping it to a few gray levels.
    arr = arr.astype(np.float64)
    lo, hi = np.percentile(arr, [0.1, 99.9])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB (gray is replicated, alpha dropped)."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFF
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(_to_uint8(arr, path)[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = _to_uint8(arr[..., :3], path)
    else:
        raise IngestError(f"{path}: expected a 2-D gray, RGB or RGBA image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask as H x W int32: binary masks become {0, 1}, instance id maps keep their ids."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        elif arr.shape[-1] in (3, 4):
            arr = (arr[..., :3] > 0).any(axis=-1)
        elif arr.shape[-1] == 1:
            arr = arr[..., 0]
        else:
            raise IngestError(f"{path}: expected a 2-D mask, got shape {arr.shape}")
    if arr.ndim != 2:
        raise IngestError(f"{path}: expected a 2-D mask, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.mod(arr, 1) == 0):
        raise IngestError(f"{path}: mask has fractional values; expected binary or integer instance ids")
    values = np.unique(arr)
    if values.min() < 0:
        raise IngestError(f"{path}: mask has negative values")
    if len(values) <= 2:  # binary, whatever the foreground value (1, 255, True ...)
        return (arr > 0).astype(np.int32)
    return arr.astype(np.int32)


def _index_folder(folder: Path, suffixes: tuple[str, ...], kind: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise IngestError(f"{folder}: {kind} folder does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise IngestError(f"{path}: {kind} name '{path.stem}' also used by {found[path.stem]}; stems must be unique")
        found[path.stem] = path
    if not found:
        raise IngestError(f"{folder}: no {kind} files found (looked for {', '.join(suffixes)})")
    return found


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair images and masks by file stem; any unpaired file is an error naming it."""
    images = _index_folder(Path(images_dir), IMAGE_SUFFIXES, "image")
    masks = _index_folder(Path(masks_dir), MASK_SUFFIXES, "mask")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask:
        raise IngestError(f"{images[no_mask[0]]}: image has no mask named '{no_mask[0]}.*' in {masks_dir}"
                          + (f" (and {len(no_mask) - 1} more)" if len(no_mask) > 1 else ""))
    if no_image:
        raise IngestError(f"{masks[no_image[0]]}: mask has no image named '{no_image[0]}.*' in {images_dir}"
                          + (f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""))
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def read_label_csv(path: str | Path, names: set[str]) -> dict[str, str]:
    """Read ``name,label`` rows; names may carry a file ending. Unknown or missing names raise."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: label CSV does not exist")
    labels: dict[str, str] = {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["name", "label"]:
        rows = rows[1:]
    for line, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2 or not row[1].strip():
            raise IngestError(f"{path}: row {line} is not 'name,label': {row}")
        name = Path(row[0].strip()).stem
        if name not in names:
            raise IngestError(f"{path}: row {line} names '{row[0].strip()}', which is not among the images")
        labels[name] = row[1].strip()
    missing = sorted(names - set(labels))
    if missing:
        raise IngestError(f"{path}: no label for image '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return labels


def _folder_labels(images_dir: Path, pairs: list[tuple[str, Path, Path]], default_label: str) -> dict[str, str]:
    parents = {stem: img.parent.relative_to(images_dir) for stem, img, _ in pairs}
    if all(p == Path(".") for p in parents.values()):
        return {stem: default_label for stem in parents}
    flat = [stem for stem, p in parents.items() if p == Path(".")]
    if flat:
        raise IngestError(f"{images_dir / flat[0]}: some images sit in label subfolders and some do not; "
                          "put every image in a subfolder or pass --labels")
    return {stem: p.parts[0] for stem, p in parents.items()}


def load_pairs(
    images_dir: str | Path,
    masks_dir: str | Path,
    labels_csv: str | Path | None = None,
    default_label: str = DEFAULT_LABEL,
) -> list[Sample]:
    """Load every image/mask pair of two folders with its label, checking everything first."""
    images_dir = Path(images_dir)
    pairs = pair_files(images_dir, masks_dir)
    if labels_csv is not None:
        labels = read_label_csv(labels_csv, {stem for stem, _, _ in pairs})
    else:
        labels = _folder_labels(images_dir, pairs, default_label)
    samples = []
    for stem, img_path, mask_path in pairs:
        image, mask = read_image(img_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise IngestError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                              f"{img_path.name} size {image.shape[1]}x{image.shape[0]}")
        samples.append(Sample(stem, image, mask, labels[stem], img_path, mask_path))
    return samples
