"""Read a user's image and mask folders into checked, normalised pairs.

Images: PNG / TIFF / JPEG, gray, gray+alpha, RGB, RGBA, palette or CMYK, 8 or 16 bit or float
-> RGB uint8. Masks: PNG / TIFF, binary (any nonzero value is foreground) -> {0, 1}; instance ids
are kept as ids; palette masks are read by palette index (index 0 is background).
Ambiguous files are refused, never guessed: a TIFF with several planes (a z-stack or channels not
marked as RGB), a float image with NaN or infinite pixels, a mask with fractional values.
Labels: a ``name,label`` CSV, else the image's subfolder name, else one default label.
Every problem raises ``IngestError`` naming the offending file, before anything is written.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".tif", ".tiff")  # JPEG is lossy: its masks would carry noise at edges
DEFAULT_LABEL = "nuclei"
# folders that tools create beside the data (Jupyter, macOS archives, editors): never data
IGNORED_DIRS = ("__MACOSX", "__pycache__")
CSV_NAME_HEADERS = ("name", "file", "filename", "file_name", "image", "stem")


class IngestError(ValueError):
    """Bad user input; the message names the file and says what to do."""


@dataclass
class Sample:
    """One source image with its mask and condition label."""

    name: str
    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W int32: 0 background, 1 nucleus, or instance ids 1..K (multiclass: class ids)
    label: str
    image_path: Path
    mask_path: Path
    multiclass: bool = False  # mask holds the class ids of K > 2 mask classes (``mask_classes``), tiled as they are

    @property
    def binary_mask(self) -> np.ndarray:
        return (self.mask > 0).astype(np.uint8)


# ----------------------------------------------------------------------------- reading files


def _native(arr: np.ndarray) -> np.ndarray:
    """Big-endian TIFF / 16-bit PNG data in the machine's byte order (numpy ops expect it)."""
    return arr.astype(arr.dtype.newbyteorder("=")) if arr.dtype.byteorder not in ("=", "|") else arr


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    c, m, y, k = (cmyk[..., i].astype(np.float64) / 255.0 for i in range(4))
    rgb = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _apply_colormap(index: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    cmap = np.asarray(colormap)
    if cmap.max() > 255:  # TIFF colormaps are 16 bit
        cmap = cmap / 257.0
    return np.moveaxis(cmap[:, index], 0, -1).round().astype(np.uint8)


def _read_tiff(path: Path, mask: bool) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr, axes = _native(series.asarray()), series.axes
        page = series.keyframe
        photometric, colormap = page.photometric, page.colormap
    if arr.size == page.size:
        # one page's worth of data, e.g. a (1, H, W) array: the page itself says which axis is which
        # (the axes guessed for a shaped series with length-1 dimensions can be wrong)
        arr, axes = arr.reshape(page.shape), page.axes
    else:  # length-1 axes carry nothing; what is left must be one plane
        keep = [i for i, a in enumerate(axes) if a in "YX" or arr.shape[i] > 1]
        arr, axes = arr.reshape([arr.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if axes == "SYX":  # planar RGB
        arr, axes = np.moveaxis(arr, 0, -1), "YXS"
    if axes == "YX":
        if mask:
            return arr  # a palette or inverted-display mask is read by its stored values
        if photometric == tifffile.PHOTOMETRIC.PALETTE and colormap is not None:
            return _apply_colormap(arr, colormap)
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE:  # stored dark = displayed bright
            if arr.dtype == bool:
                return ~arr
            return (np.iinfo(arr.dtype).max - arr) if np.issubdtype(arr.dtype, np.integer) else -arr
        return arr
    if axes == "YXS" and arr.shape[-1] <= 4:
        if photometric == tifffile.PHOTOMETRIC.SEPARATED:
            if mask or arr.shape[-1] != 4 or arr.dtype != np.uint8:
                raise IngestError(f"{path}: CMYK TIFF {'masks are' if mask else 'with this layout is'} not "
                                  "supported; save it as RGB" + (" or gray" if mask else ""))
            return _cmyk_to_rgb(arr)
        return arr
    raise IngestError(f"{path}: TIFF holds several planes (axes {axes}, shape {tuple(arr.shape)}), e.g. a z-stack "
                      "or channels not marked as RGB; save one 2-D gray or RGB plane per file "
                      "(for a z-stack, e.g. its maximum projection)")


def _read_pil(path: Path, mask: bool) -> np.ndarray:
    with Image.open(path) as im:
        if getattr(im, "n_frames", 1) > 1:
            raise IngestError(f"{path}: file holds {im.n_frames} frames; save one image per file")
        im.load()  # forces the full decode now: truncated files fail here, not later
        if im.mode in ("P", "PA"):
            if mask:  # palette masks are label images: the index is the label, whatever its colour
                arr = np.asarray(im)
                return arr[..., 0] if arr.ndim == 3 else arr
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            if mask:
                raise IngestError(f"{path}: a {im.mode} mask is not supported; save masks as gray or palette images")
            im = im.convert("RGB")  # PIL undoes Adobe's inverted CMYK while decoding
        elif im.mode in ("RGBa", "La"):  # premultiplied alpha
            im = im.convert(im.mode.upper())
        return _native(np.asarray(im))


def _read_raw(path: Path, mask: bool = False) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff(path, mask)
        else:
            arr = _read_pil(path, mask)
    except IngestError:
        raise
    except Exception as exc:  # PIL and tifffile raise many types for broken files
        raise IngestError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from exc
    if arr.size == 0:
        raise IngestError(f"{path}: the file holds no pixels")
    return arr


def _check_finite(arr: np.ndarray, path: Path) -> None:
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise IngestError(f"{path}: {bad} of {arr.size} pixels are NaN or infinite; replace them with "
                              "numbers (e.g. 0) and save the file again")


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise IngestError(f"{path}: unsupported pixel type {arr.dtype}")
    _check_finite(arr, path)
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
    if arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(_to_uint8(arr, path)[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = _to_uint8(arr[..., :3], path)
    else:
        raise IngestError(f"{path}: expected a 2-D gray, RGB or RGBA image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path, keep_values: bool = False) -> np.ndarray:
    """Read a mask as H x W int32: binary masks become {0, 1}, instance id maps keep their ids.
    ``keep_values``: every value is kept (class ids of multi-class masks: {0, 2} is not {0, 1})."""
    path = Path(path)
    arr = _read_raw(path, mask=True)
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # transparent pixels are background
        alpha = arr[..., -1]
        arr = np.where((alpha == 0)[..., None], 0, arr[..., :-1])
    if arr.ndim == 3:
        if arr.shape[-1] == 1 or (arr.shape[-1] == 3 and np.array_equal(arr[..., 0], arr[..., 1])
                                  and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        elif arr.shape[-1] == 3:  # colour-coded nuclei on black
            arr = (arr > 0).any(axis=-1)
        else:
            raise IngestError(f"{path}: expected a 2-D mask, got shape {arr.shape}")
    if arr.ndim != 2:
        raise IngestError(f"{path}: expected a 2-D mask, got shape {arr.shape}")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise IngestError(f"{path}: unsupported mask pixel type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        _check_finite(arr, path)
        if not np.all(np.mod(arr, 1) == 0):
            raise IngestError(f"{path}: mask has fractional values; expected binary or integer instance ids")
    values = np.unique(arr)
    if values.min() < 0:
        raise IngestError(f"{path}: mask has negative values")
    if len(values) <= 2 and not keep_values:  # binary, whatever the foreground value (1, 255, True ...)
        return (arr > 0).astype(np.int32)
    if values.max() > np.iinfo(np.int32).max:  # ids beyond int32: renumber, keeping 0 as background
        inverse = np.searchsorted(values, arr)
        return (inverse + (values[0] != 0)).astype(np.int32)
    return arr.astype(np.int32)


# ----------------------------------------------------------------------------- folders


def _ignored_dir(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_DIRS


def _walk(folder: Path, skip: Path | None) -> Iterator[Path]:
    """Every visible file below ``folder``, following folder links (label subfolders are often
    links to the real data), each real folder once, and never into ``skip``."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back to a folder already walked
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _ignored_dir(d)
                       and (skip is None or Path(os.path.realpath(os.path.join(dirpath, d))) != skip)]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def find_files(folder: str | Path, suffixes: tuple[str, ...], skip: Path | None = None) -> list[Path]:
    """Data files below ``folder`` with one of ``suffixes``, sorted; hidden and tool folders left out."""
    return sorted(p for p in _walk(Path(folder), skip) if p.suffix.lower() in suffixes and p.is_file())


def _index_folder(folder: Path, suffixes: tuple[str, ...], kind: str, skip: Path | None = None) -> dict[str, Path]:
    if not folder.exists():
        raise IngestError(f"{folder}: {kind} folder does not exist")
    if not folder.is_dir():
        raise IngestError(f"{folder}: is a file, not a folder of {kind}s")
    found: dict[str, Path] = {}
    for path in find_files(folder, suffixes, skip):
        if path.stem in found:
            raise IngestError(f"{path}: {kind} name '{path.stem}' also used by {found[path.stem]}; stems must be unique")
        found[path.stem] = path
    if not found:
        raise IngestError(f"{folder}: no {kind} files found (looked for {', '.join(suffixes)})")
    return found


def pair_files(images_dir: str | Path, masks_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """Pair images and masks by file stem; any unpaired file is an error naming it."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    image_root, mask_root = images_dir.resolve(), masks_dir.resolve()
    if image_root == mask_root:
        raise IngestError(f"{masks_dir}: the masks folder is the images folder; masks need their own folder "
                          "(same file stems as the images)")
    # one folder inside the other (masks/ below the images): each index leaves the other out
    images = _index_folder(images_dir, IMAGE_SUFFIXES, "image", mask_root if image_root in mask_root.parents else None)
    masks = _index_folder(masks_dir, MASK_SUFFIXES, "mask", image_root if mask_root in image_root.parents else None)
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask:
        raise IngestError(f"{images[no_mask[0]]}: image has no mask named '{no_mask[0]}.*' in {masks_dir}"
                          + (f" (and {len(no_mask) - 1} more)" if len(no_mask) > 1 else ""))
    if no_image:
        raise IngestError(f"{masks[no_image[0]]}: mask has no image named '{no_image[0]}.*' in {images_dir}"
                          + (f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""))
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


# ----------------------------------------------------------------------------- label CSV


def _csv_text(path: Path) -> str:
    """The CSV as text: UTF-8 (with or without Excel's BOM) or UTF-16 with BOM; else a clear error."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text"
        return data.decode("utf-16")
    for magic, kind in ((b"\x89PNG", "PNG image"), (b"\xff\xd8\xff", "JPEG image"), (b"II*\x00", "TIFF image"),
                        (b"MM\x00*", "TIFF image"), (b"PK\x03\x04", "zip or Excel .xlsx"), (b"%PDF", "PDF")):
        if data.startswith(magic):
            raise IngestError(f"{path}: this is a {kind}, not a CSV; pass a text file of 'name,label' rows")
    if b"\x00" in data[:4096]:
        raise IngestError(f"{path}: this is a binary file, not a CSV; pass a text file of 'name,label' rows")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IngestError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at position {exc.start}); "
                          "save it as UTF-8 (Excel: 'CSV UTF-8')") from None


def _delimiter(text: str, names: set[str]) -> str:
    """',' unless ';' or tab splits more rows into a known name and a label: Excel writes ';' where
    ',' is the decimal mark, and tabs in "Unicode text"; a name may itself hold a ',' or ';'."""
    def known_rows(delimiter: str) -> int:
        try:
            rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            return sum(len(r) >= 2 and _csv_name(r[0].strip(), names) is not None for r in rows)
        except csv.Error:
            return -1
    return max((",", ";", "\t"), key=known_rows)  # max keeps the first of equals: ','


def _csv_name(cell: str, names: set[str]) -> str | None:
    """The image stem a CSV cell means: the stem itself, a file name, or a path to the file."""
    cell = Path(cell.replace("\\", "/")).name
    if cell in names:  # also stems that contain dots, such as 's0.v1'
        return cell
    stem, suffix = os.path.splitext(cell)
    return stem if suffix.lower() in IMAGE_SUFFIXES + MASK_SUFFIXES and stem in names else None


def read_label_csv(path: str | Path, names: set[str]) -> dict[str, str]:
    """Read ``name,label`` rows; names may carry a file ending. Unknown, missing or twice-labelled
    names raise; row numbers are the file's line numbers."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"{path}: label CSV " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    text = _csv_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text, names))
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    header_seen = False
    try:
        for row in reader:
            line = reader.line_num
            if not row or not "".join(row).strip():
                continue
            cells = [c.strip() for c in row]
            if not header_seen:
                header_seen = True
                if cells[0].lower() in CSV_NAME_HEADERS and _csv_name(cells[0], names) is None:
                    continue
            if len(cells) < 2 or not cells[1]:
                raise IngestError(f"{path}: row {line} is not 'name,label': {row}")
            name = _csv_name(cells[0], names)
            if name is None:
                raise IngestError(f"{path}: row {line} names '{cells[0]}', which is not among the images")
            if name in labels and labels[name] != cells[1]:
                raise IngestError(f"{path}: rows {first_line[name]} and {line} give '{name}' two labels "
                                  f"('{labels[name]}' and '{cells[1]}'); keep one")
            labels.setdefault(name, cells[1])
            first_line.setdefault(name, line)
    except csv.Error as exc:
        raise IngestError(f"{path}: row {reader.line_num} is not valid CSV ({exc})") from None
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
        raise IngestError(f"{pairs[[s for s, _, _ in pairs].index(flat[0])][1]}: some images sit in label "
                          "subfolders and some do not; put every image in a subfolder or pass --labels")
    return {stem: p.parts[0] for stem, p in parents.items()}


def _check_mask_content(samples: list[Sample], masks_dir: Path) -> None:
    """Masks that are empty everywhere, or foreground everywhere, are a wrong folder or an inverted
    convention, never data to train on."""
    if all(not s.mask.any() for s in samples):
        raise IngestError(f"{samples[0].mask_path}: this and every other mask in {masks_dir} is empty (no nonzero "
                          "pixel); masks must mark nuclei with nonzero values")
    if all(s.mask.all() for s in samples):
        raise IngestError(f"{samples[0].mask_path}: this and every other mask in {masks_dir} is foreground "
                          "everywhere; masks must mark background with 0 (is this the images folder, or are "
                          "the masks inverted?)")


def load_pairs(
    images_dir: str | Path,
    masks_dir: str | Path,
    labels_csv: str | Path | None = None,
    default_label: str = DEFAULT_LABEL,
    keep_values: bool = False,
) -> list[Sample]:
    """Load every image/mask pair of two folders with its label, checking everything first.
    ``keep_values``: masks keep every value (``read_mask``), as multi-class masks need."""
    images_dir = Path(images_dir)
    pairs = pair_files(images_dir, masks_dir)
    if labels_csv is not None:
        labels = read_label_csv(labels_csv, {stem for stem, _, _ in pairs})
    else:
        labels = _folder_labels(images_dir, pairs, default_label)
    samples = []
    for stem, img_path, mask_path in pairs:
        image, mask = read_image(img_path), read_mask(mask_path, keep_values)
        if image.shape[:2] != mask.shape:
            raise IngestError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                              f"{img_path.name} size {image.shape[1]}x{image.shape[0]}")
        samples.append(Sample(stem, image, mask, labels[stem], img_path, mask_path))
    _check_mask_content(samples, Path(masks_dir))
    return samples


# ----------------------------------------------------------------------------- nnU-Net datasets


def dataset_image_to_rgb(image: np.ndarray, stored_dtype: str, path: Path) -> np.ndarray:
    """A case's ``C x H x W`` channels (as nnU-Net reads them) as the tool's ``H x W x 3`` uint8:
    1 channel is gray (replicated over R, G, B), 2 channels fill R and G (B stays 0), 3 channels are
    R, G, B in channel_names order; more than 3 are refused. 8-bit data is kept as it is, other
    pixel types are stretched per image over all channels together (0.1-99.9th percentile)."""
    c = image.shape[0]
    if c > 3:
        raise IngestError(f"{path}: the dataset has {c} channels; the generator makes gray, 2-channel or RGB images")
    hwc = np.moveaxis(image, 0, -1)
    if stored_dtype == "uint8":
        hwc = np.clip(np.rint(hwc), 0, 255).astype(np.uint8)
    else:
        _check_finite(hwc, path)
        hwc = _to_uint8(hwc.astype(np.float64), path)
    if c == 1:
        return np.ascontiguousarray(np.repeat(hwc, 3, axis=-1))
    if c == 2:
        return np.ascontiguousarray(np.concatenate([hwc, np.zeros_like(hwc[..., :1])], axis=-1))
    return np.ascontiguousarray(hwc)


def load_dataset_pairs(dataset_dir: str | Path, default_label: str = DEFAULT_LABEL) -> list[Sample]:
    """The real cases of an nnU-Net v2 raw dataset as samples, read through nnU-Net's own
    reader/writer for its file ending (synthetic cases this tool added are left out).

    Condition labels: those recorded when the cases were imported by this tool, else one default.
    Masks keep the dataset's label ids (any nonzero id is foreground for the binary generator)."""
    from nnunet_integration.cases import IncompatibleDatasetError
    from nnunet_integration.formats import read_real_cases
    from nnunet_integration.manifest import load_labels

    dataset_dir = Path(dataset_dir)
    try:
        cases, fmt = read_real_cases(dataset_dir)
    except (IncompatibleDatasetError, FileNotFoundError) as exc:
        raise IngestError(str(exc)) from None
    recorded = load_labels(dataset_dir)
    samples = []
    for case in cases:
        image = dataset_image_to_rgb(case.image, fmt.dtype, case.image_paths[0])
        mask = case.seg
        if mask.min() < 0:
            raise IngestError(f"{case.label_path}: label has negative values")
        samples.append(Sample(case.name, image, mask, recorded.get(case.name, default_label),
                              case.image_paths[0], case.label_path))
    _check_mask_content(samples, dataset_dir / "labelsTr")
    return samples


def is_gray(image: np.ndarray) -> bool:
    """R = G = B at every pixel of an H x W x 3 image."""
    return np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])


def image_channels(samples: list[Sample]) -> int:
    """What the samples' images hold: 1 (gray: R = G = B everywhere), 2 (B empty) or 3 (RGB)."""
    return 1 if all(is_gray(s.image) for s in samples) else 3


def gray_labels(samples: list[Sample]) -> list[str]:
    """The labels whose every image is gray (brightfield, fluorescence): their synthetic images are
    made gray too (``generator.Generator``)."""
    colour = {s.label for s in samples if not is_gray(s.image)}
    return sorted({s.label for s in samples} - colour)
