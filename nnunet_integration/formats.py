"""The file format of a 2D nnU-Net v2 raw dataset, and its cases read and written in that format.

nnU-Net picks a reader/writer class for a dataset from its dataset.json
(``nnunetv2.imageio.reader_writer_registry.determine_reader_writer_from_dataset_json``: the
``overwrite_image_reader_writer`` key, else the ``file_ending``). Three of them hold 2D data and are
supported here:

- ``NaturalImage2DIO`` (``.png``): one RGB file holds 3 channels, a gray file one; no spacing.
- ``SimpleITKIO`` (``.nii.gz``, ``.nrrd``, ``.mha``, ``.gipl``): one file per channel, 2D or 3D with
  one slice; spacing, origin and direction live in each file's header.
- ``Tiff3DIO`` (``.tif``, ``.tiff``): one file per channel holding one slice (1 x H x W), spacing in
  a ``<case>.json`` beside the files of imagesTr and labelsTr.

``dataset_format`` reads what a synthetic case has to look like from dataset.json and the real
cases: file ending, channel count and how the channels are spread over files, pixel type and
intensity range, geometry (spacing ...). ``encode_case`` turns a generated ``uint8 H x W x 3`` image
and its mask into the files of one case: labels through the reader/writer's own ``write_seg``,
images with the library its reader uses (nnU-Net's reader/writers have no image writer), and every
case is read back through the reader/writer before it is handed on, so each file is one nnU-Net
reads. ``read_case`` reads a case as nnU-Net does (channels first) for training.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nnunet_integration.cases import IncompatibleDatasetError, list_cases, read_dataset_json
from nnunet_integration.manifest import load_manifest

NATURAL, SITK, TIFF = "NaturalImage2DIO", "SimpleITKIO", "Tiff3DIO"
SUPPORTED_READERS = (NATURAL, SITK, TIFF)
# channel conversions a user may ask for when the generator's images and the dataset differ
CONVERSIONS = ("gray", "rgb")
_RANGE_CASES = 16  # real cases read to measure the pixel type and intensity range
_LUMA = np.array([0.299, 0.587, 0.114])


def _registry():
    from nnunetv2.imageio import reader_writer_registry

    return reader_writer_registry


def reader_writer_name(dataset_json: Mapping[str, Any], example_file: Path | None = None) -> str:
    """The name of the reader/writer class nnU-Net uses for this dataset, chosen as nnU-Net does
    (with a real case's first image as the example it tries each candidate on: a 2D ``.tif`` is
    read by NaturalImage2DIO, a one-slice ``.tif`` by Tiff3DIO); a clear error for one that does
    not hold 2D cases this module can write."""
    ending = dataset_json.get("file_ending")
    if not isinstance(ending, str):
        raise IncompatibleDatasetError("dataset.json has no file_ending")
    try:
        # nnU-Net prints a traceback for every candidate that cannot read the example: not ours to show
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            rw = _registry().determine_reader_writer_from_dataset_json(
                dict(dataset_json), str(example_file) if example_file is not None else None, verbose=False)
    except RuntimeError:
        raise IncompatibleDatasetError(f"file_ending is {ending!r}: nnU-Net has no reader for it") from None
    name = rw.__name__
    if ending.lower() not in rw.supported_file_endings:
        raise IncompatibleDatasetError(f"file_ending is {ending!r}, which {name} does not read "
                                       f"({', '.join(rw.supported_file_endings)})")
    if name not in SUPPORTED_READERS:
        raise IncompatibleDatasetError(
            f"file_ending is {ending!r} read by {name}; cases can be written for {', '.join(SUPPORTED_READERS)} "
            "(.png; .nii.gz, .nrrd, .mha; .tif)")
    return name


def _reader_writer(name: str):
    return getattr(_registry(), name)()


@dataclass
class DatasetFormat:
    """What a case of one dataset looks like on disk (see the module docstring)."""

    file_ending: str
    reader: str
    channels: int  # entries of channel_names
    file_channels: tuple[int, ...]  # channels held by each image file, in order (e.g. (3,) for one RGB PNG)
    dtype: str = "uint8"  # pixel type of the real images
    value_range: list[tuple[float, float]] | None = None  # per channel, of the real images (None: uint8 as is)
    labels: dict[str, int] = field(default_factory=dict)
    spacing: list[float] | None = None  # Tiff3DIO: the real cases' aux-file spacing
    geometry: dict[str, Any] | None = None  # SimpleITKIO: spacing, origin, direction, dimension of a real case

    def image_files(self, name: str) -> list[str]:
        return [f"imagesTr/{name}_{i:04d}{self.file_ending}" for i in range(len(self.file_channels))]

    def label_file(self, name: str) -> str:
        return f"labelsTr/{name}{self.file_ending}"

    def aux_files(self, name: str) -> list[str]:
        """Files beside the images and label that belong to the case (Tiff3DIO's spacing files)."""
        return [f"labelsTr/{name}.json", f"imagesTr/{name}.json"] if self.reader == TIFF else []

    def files(self, name: str) -> list[str]:
        """Every file of a case in the order it is published: spacing files, label, images."""
        return [*self.aux_files(name), self.label_file(name), *self.image_files(name)]


def default_file_channels(reader: str, channels: int) -> tuple[int, ...]:
    if reader == NATURAL and channels == 3:
        return (3,)  # one RGB PNG, as this tool has always written
    return (1,) * channels


def _stored_array(path: Path, reader: str) -> np.ndarray:
    """A file's pixels as stored (its own pixel type), for the pixel type and range of real cases."""
    if reader == TIFF:
        import tifffile

        return np.asarray(tifffile.imread(path))
    if reader == SITK:
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _file_channels(arr: np.ndarray, reader: str) -> int:
    return arr.shape[-1] if reader == NATURAL and arr.ndim == 3 else 1


def dataset_format(dataset_dir: Path, dataset_json: Mapping[str, Any] | None = None) -> DatasetFormat:
    """The format synthetic cases of ``dataset_dir`` are written in, from its dataset.json and real cases.

    Raises ``IncompatibleDatasetError`` for what cannot be written: an unsupported reader, more
    than 3 channels, labels that are not single integers with background 0 and a foreground 1,
    real cases with more than one slice.
    """
    dataset_dir = Path(dataset_dir)
    dj = dict(dataset_json) if dataset_json is not None else read_dataset_json(dataset_dir)[0]
    problems = []
    manifest = load_manifest(dataset_dir)
    synthetic = set(manifest.cases) if manifest is not None else set()
    try:
        cases = {k: v for k, v in list_cases(dataset_dir, dj).items() if k not in synthetic}
    except (FileNotFoundError, KeyError):
        cases = {}
    real = [cases[k] for k in sorted(cases)][:_RANGE_CASES]
    example = dataset_dir / real[0]["images"][0] if real and real[0]["images"] else None
    reader = reader_writer_name(dj, example if example is not None and example.is_file() else None)
    channels = dj.get("channel_names", dj.get("modality"))
    n_channels = len(channels) if isinstance(channels, Mapping) else 0
    if not 1 <= n_channels <= 3:
        problems.append(f"channel_names has {n_channels or 'no'} entries; cases can be written with 1 (gray), "
                        "2 or 3 (RGB) channels")
    labels = dj.get("labels")
    if not isinstance(labels, Mapping) or not all(isinstance(v, int) for v in labels.values()):
        problems.append("labels must map names to single integers (region labels are not supported)")
    elif not {0, 1} <= set(labels.values()):
        problems.append(f"labels {dict(labels)} lack background 0 and nucleus 1")
    if problems:
        raise IncompatibleDatasetError("dataset.json does not match the cases to write: " + "; ".join(problems))
    fmt = DatasetFormat(dj["file_ending"], reader, n_channels, default_file_channels(reader, n_channels),
                        labels=dict(labels))
    if not real:
        return fmt
    first = real[0]
    arrays = [_stored_array(dataset_dir / f, reader) for f in first["images"]]
    fmt.file_channels = tuple(_file_channels(a, reader) for a in arrays)
    if sum(fmt.file_channels) != n_channels:
        raise IncompatibleDatasetError(
            f"{dataset_dir / first['images'][0]}: its case holds {sum(fmt.file_channels)} channel(s) in "
            f"{len(arrays)} file(s), dataset.json's channel_names has {n_channels}")
    fmt.dtype = str(arrays[0].dtype)
    if fmt.dtype != "uint8":  # uint8 images are written as the generator makes them
        per_channel: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
        for case in real:
            c = 0
            for f in case["images"]:
                arr = _stored_array(dataset_dir / f, reader).astype(np.float64)
                planes = np.moveaxis(arr, -1, 0) if _file_channels(arr, reader) > 1 else arr[None]
                for plane in planes:
                    per_channel[c].append(plane.ravel())
                    c += 1
        fmt.value_range = [(float(np.percentile(np.concatenate(v), 0.1)), float(np.percentile(np.concatenate(v), 99.9)))
                           for v in per_channel]
    if reader == TIFF:
        aux = dataset_dir / "labelsTr" / (Path(first["label"]).name[:-len(fmt.file_ending)] + ".json")
        if aux.is_file():
            fmt.spacing = [float(s) for s in json.loads(aux.read_text())["spacing"]]
    if reader == SITK:
        import SimpleITK as sitk

        ref = sitk.ReadImage(str(dataset_dir / first["images"][0]))
        fmt.geometry = {"spacing": list(ref.GetSpacing()), "origin": list(ref.GetOrigin()),
                        "direction": list(ref.GetDirection()), "dimension": ref.GetDimension()}
    return fmt


# ----------------------------------------------------------------------------- channels


def source_channels_fit(fmt: DatasetFormat, source_channels: int, convert: str | None) -> None:
    """Refuse images of ``source_channels`` (1 gray, 2, 3 RGB) for the dataset unless they fit it or
    ``convert`` ('gray' or 'rgb') asks for a conversion that makes them fit."""
    if convert is not None and convert not in CONVERSIONS:
        raise ValueError(f"--channels must be one of {', '.join(CONVERSIONS)}, got {convert!r}")
    kind = {1: "gray", 2: "2-channel", 3: "RGB"}.get(source_channels, f"{source_channels}-channel")
    if convert == "gray" and fmt.channels != 1:
        raise IncompatibleDatasetError(f"--channels gray writes 1 channel, the dataset has {fmt.channels}")
    if convert == "rgb" and fmt.channels != 3:
        raise IncompatibleDatasetError(f"--channels rgb writes 3 channels, the dataset has {fmt.channels}")
    if convert is None and source_channels != fmt.channels:
        hint = {1: " (--channels gray converts RGB images to gray)", 3: " (--channels rgb writes gray images as RGB)"}
        raise IncompatibleDatasetError(
            f"the generator makes {kind} images, the dataset has {fmt.channels} channel(s) in channel_names"
            + hint.get(fmt.channels, "; it cannot be written into"))


def to_channels(image: np.ndarray, fmt: DatasetFormat, convert: str | None) -> np.ndarray:
    """A ``uint8 H x W x 3`` image as the dataset's ``C x H x W`` channels, in the dataset's pixel
    type and intensity range."""
    rgb = np.asarray(image, dtype=np.float64)
    if convert == "gray":
        planes = (rgb @ _LUMA)[None]
    else:  # gray sources are replicated over R, G, B: the first channels are the source's
        planes = np.moveaxis(rgb, -1, 0)[:fmt.channels]
    if fmt.value_range is None:
        return np.clip(np.rint(planes), 0, 255).astype(np.uint8)
    out = np.stack([lo + p / 255.0 * (hi - lo) for p, (lo, hi) in zip(planes, fmt.value_range)])
    dtype = np.dtype(fmt.dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    return out.astype(dtype)


# ----------------------------------------------------------------------------- label ids


GENERATOR_FIX = "train on data with the dataset's classes (the same names and ids)"
REAL_FIX = "write them into a new dataset, or into one whose labels are those classes (the same names and ids)"


def mask_labels_fit(fmt: DatasetFormat, mask_labels: Mapping[str, int] | None, whose: str = "the generator's",
                    fix: str = GENERATOR_FIX) -> None:
    """Refuse masks whose classes are not the dataset's. ``mask_labels`` (name -> id, ids 0 .. K-1)
    are the generator's classes (``whose`` and ``fix`` word the error for other masks, e.g. imported
    ones); None or two of them is the binary generator (ids 0 / 1), which a dataset with more than
    two labels does not take. With K > 2 classes the dataset's labels must be the same names with
    the same ids: a mask id written under another name would be wrong."""
    theirs = dict(fmt.labels)
    binary = mask_labels is None or len(mask_labels) == 2
    if binary and len(theirs) > 2:
        raise IncompatibleDatasetError(
            f"the generator makes binary masks (background 0, nucleus 1); the dataset has {len(theirs)} labels "
            f"{theirs}: train a generator on this dataset's labels (`pathar-aug train --dataset`)")
    if not binary and dict(mask_labels) != theirs:
        raise IncompatibleDatasetError(f"{whose} mask classes {dict(mask_labels)} are not the dataset's labels {theirs}; "
                                       f"{fix}")


# ----------------------------------------------------------------------------- writing


def _natural(array: np.ndarray, ending: str) -> bytes:
    """A 2D gray or RGB file as NaturalImage2DIO reads it: PNG, BMP, or a plain 2D TIFF."""
    array = np.ascontiguousarray(array)
    buf = io.BytesIO()
    if ending.lower() == ".tif":
        import tifffile

        tifffile.imwrite(buf, array, photometric="rgb" if array.ndim == 3 else "minisblack")
    else:
        from PIL import Image

        Image.fromarray(array).save(buf, format="BMP" if ending.lower() == ".bmp" else "PNG")
    return buf.getvalue()


def _write_image(path: Path, plane: np.ndarray, fmt: DatasetFormat) -> None:
    """One image file: ``plane`` is H x W (one channel) or H x W x C (PNG with several channels)."""
    if fmt.reader == NATURAL:
        path.write_bytes(_natural(plane, fmt.file_ending))
    elif fmt.reader == TIFF:
        import tifffile

        tifffile.imwrite(path, plane[None], compression="zlib")  # one slice: Tiff3DIO reads 3D files only
    else:
        import SimpleITK as sitk

        geometry = fmt.geometry or {"spacing": [1.0, 1.0], "origin": [0.0, 0.0], "direction": [1.0, 0.0, 0.0, 1.0],
                                    "dimension": 2}
        image = sitk.GetImageFromArray(plane if geometry["dimension"] == 2 else plane[None])
        image.SetSpacing(geometry["spacing"])
        image.SetOrigin(geometry["origin"])
        image.SetDirection(geometry["direction"])
        sitk.WriteImage(image, str(path), True)


def _write_label(path: Path, mask: np.ndarray, fmt: DatasetFormat) -> None:
    rw = _reader_writer(fmt.reader)
    if fmt.reader == NATURAL:
        path.write_bytes(_natural(mask.astype(np.uint8), fmt.file_ending))  # what write_seg writes
    elif fmt.reader == TIFF:
        rw.write_seg(mask[None], str(path), {"spacing": fmt.spacing or [999.0, 1.0, 1.0]})
    else:
        geometry = fmt.geometry or {"spacing": [1.0, 1.0], "origin": [0.0, 0.0], "direction": [1.0, 0.0, 0.0, 1.0],
                                    "dimension": 2}
        sitk_stuff = {k: tuple(geometry[k]) for k in ("spacing", "origin", "direction")}
        rw.write_seg(mask[None], str(path), {"sitk_stuff": sitk_stuff})


def encode_case(name: str, image: np.ndarray, mask: np.ndarray, fmt: DatasetFormat,
                convert: str | None = None) -> list[tuple[str, bytes]]:
    """The files of one case, ``[(path relative to the dataset, content)]`` in publishing order.

    ``image`` is ``uint8 H x W x 3``, ``mask`` ``H x W`` with label ids of the dataset. Written into
    a scratch folder and read back through nnU-Net's reader/writer (channels, shape, label values
    checked) before the bytes are returned.
    """
    channels = to_channels(image, fmt, convert)
    with tempfile.TemporaryDirectory(prefix="pathar_case_") as scratch:
        root = Path(scratch)
        (root / "imagesTr").mkdir()
        (root / "labelsTr").mkdir()
        _write_label(root / fmt.label_file(name), np.asarray(mask), fmt)
        c = 0
        for rel, n in zip(fmt.image_files(name), fmt.file_channels):
            plane = channels[c] if n == 1 else np.moveaxis(channels[c:c + n], 0, -1)
            _write_image(root / rel, plane, fmt)
            c += n
        if fmt.reader == TIFF:  # the images' spacing file, as Tiff3DIO looks for it
            (root / f"imagesTr/{name}.json").write_text(json.dumps({"spacing": fmt.spacing or [999.0, 1.0, 1.0]}))
        rw = _reader_writer(fmt.reader)
        data, _ = rw.read_images([str(root / rel) for rel in fmt.image_files(name)])
        seg, _ = rw.read_seg(str(root / fmt.label_file(name)))
        if data.shape[0] != fmt.channels or data.shape[-2:] != mask.shape or seg.shape[-2:] != mask.shape:
            raise ValueError(f"{name}: written as {data.shape}, read back differently from {mask.shape}")
        if not np.array_equal(seg.reshape(mask.shape), mask):
            raise ValueError(f"{name}: the label file does not read back as the mask")
        return [(rel, (root / rel).read_bytes()) for rel in fmt.files(name)]


# ----------------------------------------------------------------------------- reading


@dataclass
class RawCase:
    """One case as nnU-Net reads it: ``image`` C x H x W float32, ``seg`` H x W int32."""

    name: str
    image: np.ndarray
    seg: np.ndarray
    image_paths: list[Path]
    label_path: Path


def read_case(dataset_dir: Path, name: str, entry: Mapping[str, Any], reader: str) -> RawCase:
    """Read one 2D case through nnU-Net's reader/writer; a case with several slices is an error."""
    dataset_dir = Path(dataset_dir)
    rw = _reader_writer(reader)
    images = [dataset_dir / f for f in entry["images"]]
    label = dataset_dir / entry["label"]
    try:
        data, _ = rw.read_images([str(p) for p in images])
        seg, _ = rw.read_seg(str(label))
    except Exception as exc:  # nnU-Net's readers raise AssertionError, RuntimeError, OSError ...
        raise IncompatibleDatasetError(f"{images[0]}: nnU-Net's {reader} cannot read case {name!r} "
                                       f"({type(exc).__name__}: {exc})") from exc
    if data.shape[1] != 1 or seg.shape[1] != 1:
        raise IncompatibleDatasetError(f"{images[0]}: case {name!r} has {data.shape[1]} slices; only 2D datasets "
                                       "(one slice per case) are supported")
    if data.shape[-2:] != seg.shape[-2:]:
        raise IncompatibleDatasetError(f"{label}: label size {seg.shape[-2:]} differs from the image's {data.shape[-2:]}")
    return RawCase(name, data[:, 0], seg[0, 0].astype(np.int32), images, label)


def read_real_cases(dataset_dir: Path) -> tuple[list[RawCase], DatasetFormat]:
    """Every real case of a dataset (synthetic cases of the manifest left out), with its format."""
    dataset_dir = Path(dataset_dir)
    dj, _ = read_dataset_json(dataset_dir)
    fmt = dataset_format(dataset_dir, dj)
    manifest = load_manifest(dataset_dir)
    synthetic = set(manifest.cases) if manifest is not None else set()
    cases = {k: v for k, v in list_cases(dataset_dir, dj).items() if k not in synthetic}
    if not cases:
        raise IncompatibleDatasetError(f"{dataset_dir} holds no real cases to train on")
    return [read_case(dataset_dir, name, cases[name], fmt.reader) for name in sorted(cases)], fmt
