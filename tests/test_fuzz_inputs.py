"""Property-based fuzzing of everything a user hands in: image, mask and label-CSV folders.

Hypothesis writes folders in many formats, modes, bit depths, sizes, names and encodings, with
at most one fault, then loads them with ``load_pairs`` and imports them with ``pathar-aug import``.
Whatever is written, the outcome is one of two:
- exit 0 and exactly the data that was written (images, binary masks, labels), or
- exit 2 with one line naming the faulty file, no traceback, and nothing written.
The "ci" profile (tests/conftest.py) runs a few seconds; HYPOTHESIS_PROFILE=long explores more.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import tifffile  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pathar_aug.cli import app  # noqa: E402
from pathar_aug.ingest import IngestError, load_pairs  # noqa: E402
from nnunet_integration.names import case_part as _safe  # noqa: E402

IMAGE_MODES = {
    "png": ["gray", "gray16", "rgb", "rgba", "gray_alpha", "palette", "bilevel"],
    "tif": ["gray", "gray16", "float", "rgb", "rgba", "planar_rgb", "leading_axis", "cmyk"],
    "jpg": ["gray", "rgb", "cmyk"],
}
MASK_KINDS = {
    "png": ["01", "0255", "gray16", "palette_white_background", "rgb_colour", "rgba_transparent", "gray_alpha"],
    "tif": ["01", "0255", "bool", "instance16", "leading_axis", "float01"],
}
FAULTS = ["size_mismatch", "missing_mask", "orphan_mask", "truncated_image", "garbage_mask", "nan_image",
          "z_stack", "fractional_mask", "same_folder", "all_empty", "csv_unknown_name", "csv_missing_name",
          "csv_two_labels", "csv_latin1", "png_as_csv"]
CSV_FAULTS = {"csv_unknown_name", "csv_missing_name", "csv_two_labels", "csv_latin1", "png_as_csv"}
# stems as people write them: spaces, dots, dashes, accents, commas and semicolons (CSV delimiters)
NAME_CHARS = st.sampled_from(list("abcXYZ019 -_.,;äé"))
runner = CliRunner()


@dataclass
class PairSpec:
    name: str
    size: tuple[int, int]
    image_format: str
    image_mode: str
    image_params: tuple[int, ...]  # start values and slopes of smooth colour ramps
    mask_format: str
    mask_kind: str
    rect: tuple[int, int, int, int]  # foreground rectangle y0, y1, x0, x1 (may be empty or everything)
    label: str


@dataclass
class FolderSpec:
    pairs: list[PairSpec]
    labels_from: str  # "none" | "subfolders" | "csv"
    csv_encoding: str
    csv_delimiter: str
    csv_header: bool
    csv_names_with_suffix: bool
    fault: str | None
    fault_index: int
    expected: dict = field(default_factory=dict)


def _usable(text: str) -> str:
    # a leading '.' hides a file; a leading/trailing space is lost by many tools; 'name' is a header
    if text[0] in ". " or text[-1] == " " or text.lower() in ("name", "file", "filename", "image", "stem"):
        text = "n" + text.strip(" ") + "n"
    return text


STEMS = st.text(NAME_CHARS, min_size=1, max_size=12).map(_usable)


@st.composite
def folder_specs(draw) -> FolderSpec:
    n = draw(st.integers(1, 4))
    stems = draw(st.lists(STEMS, min_size=n, max_size=n, unique_by=str.lower))
    pairs = []
    for stem in stems:
        h, w = draw(st.integers(1, 20)), draw(st.integers(1, 20))
        image_format = draw(st.sampled_from(sorted(IMAGE_MODES)))
        mask_format = draw(st.sampled_from(sorted(MASK_KINDS)))
        y0, y1 = sorted(draw(st.tuples(st.integers(0, h), st.integers(0, h))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, w), st.integers(0, w))))
        pairs.append(PairSpec(
            name=stem, size=(h, w), image_format=image_format,
            image_mode=draw(st.sampled_from(IMAGE_MODES[image_format])),
            image_params=draw(st.tuples(*[st.integers(0, 255)] * 4, *[st.integers(-6, 6)] * 4)),
            mask_format=mask_format, mask_kind=draw(st.sampled_from(MASK_KINDS[mask_format])),
            rect=(y0, y1, x0, x1), label=draw(st.sampled_from(["bright", "dark", "Färbung"]))))
    labels_from = draw(st.sampled_from(["none", "subfolders", "csv"]))
    fault = draw(st.one_of(st.none(), st.sampled_from(FAULTS)))
    if fault in CSV_FAULTS:
        labels_from = "csv"
    return FolderSpec(pairs, labels_from, draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16"])),
                      draw(st.sampled_from([",", ";", "\t"])), draw(st.booleans()), draw(st.booleans()),
                      fault, draw(st.integers(0, n - 1)))


# ----------------------------------------------------------------------------- writing files


def ramps(spec: PairSpec) -> np.ndarray:
    """H x W x 4 uint8 smooth ramps (JPEG keeps those close to the original)."""
    h, w = spec.size
    yy, xx = np.mgrid[:h, :w]
    starts, slopes = spec.image_params[:4], spec.image_params[4:]
    return np.stack([np.clip(s + k * yy + (k // 2 + 1) * xx, 0, 255) for s, k in zip(starts, slopes)],
                    axis=-1).astype(np.uint8)


def write_image(spec: PairSpec, path: Path) -> tuple[np.ndarray | None, str]:
    """Write the image; return (the RGB the tool must read, how exactly: 'exact' | 'close' | 'monotone')."""
    base, mode, fmt = ramps(spec), spec.image_mode, spec.image_format
    gray, rgb, rgba = base[..., 0], base[..., :3], base
    if fmt == "jpg":
        if mode == "gray":
            Image.fromarray(gray).save(path, quality=95)
            return np.repeat(gray[..., None], 3, -1), "close"
        Image.fromarray(rgb).convert("CMYK" if mode == "cmyk" else "RGB").save(path, quality=95)
        return rgb, "close"
    if mode == "gray16":
        values = gray.astype(np.uint16) * 200 + 1000
        Image.fromarray(values).save(path) if fmt == "png" else tifffile.imwrite(path, values)
        return values, "monotone"
    if mode == "float":
        values = gray.astype(np.float32) / 7.0 - 3.0
        tifffile.imwrite(path, values)
        return values, "monotone"
    if fmt == "png":
        if mode == "gray":
            Image.fromarray(gray).save(path)
        elif mode == "rgb":
            Image.fromarray(rgb).save(path)
        elif mode == "rgba":
            Image.fromarray(rgba).save(path)
        elif mode == "gray_alpha":
            Image.fromarray(np.stack([gray, base[..., 3]], -1), mode="LA").save(path)
        elif mode == "palette":
            index = (gray // 64).astype(np.uint8)  # 4 colours
            palette = [10, 20, 30, 200, 40, 40, 40, 180, 60, 250, 250, 240]
            im = Image.fromarray(index, mode="L").convert("P")
            im.putpalette(palette + [0] * (768 - len(palette)))
            im.putdata(index.ravel().tolist())
            im.save(path)
            return np.asarray(palette, np.uint8).reshape(4, 3)[index], "exact"
        elif mode == "bilevel":
            bits = gray > 127
            Image.fromarray(bits).save(path)
            return np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1), "exact"
        return (np.repeat(gray[..., None], 3, -1) if mode in ("gray", "gray_alpha") else rgb), "exact"
    # TIFF
    if mode == "gray":
        tifffile.imwrite(path, gray)
    elif mode == "rgb":
        tifffile.imwrite(path, rgb, photometric="rgb")
    elif mode == "rgba":
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    elif mode == "planar_rgb":
        tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    elif mode == "leading_axis":  # (1, H, 1) is ambiguous in TIFF itself: the writer stores a 1 x H page
        tifffile.imwrite(path, gray[None] if gray.shape[1] > 1 else gray, photometric="minisblack")
    elif mode == "cmyk":  # no black ink: the RGB is exactly 255 - CMY
        tifffile.imwrite(path, np.concatenate([255 - rgb, np.zeros_like(gray)[..., None]], -1), photometric="separated")
    return (np.repeat(gray[..., None], 3, -1) if mode in ("gray", "leading_axis") else rgb), "exact"


def write_mask(spec: PairSpec, path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Write the mask; return the binary mask the tool must read."""
    h, w = shape or spec.size
    fg = np.zeros((h, w), bool)
    y0, y1, x0, x1 = spec.rect
    fg[y0:y1, x0:x1] = True
    kind = spec.mask_kind
    if kind == "01":
        arr = fg.astype(np.uint8)
    elif kind == "0255":
        arr = fg.astype(np.uint8) * 255
    elif kind == "gray16":
        arr = fg.astype(np.uint16) * 65535
    elif kind == "bool":
        arr = fg
    elif kind == "instance16":
        arr = (fg * (1 + (np.mgrid[:h, :w][1] // 3) % 4)).astype(np.uint16)
    elif kind == "leading_axis":
        arr = fg.astype(np.uint8) * 255
        tifffile.imwrite(path, arr[None] if w > 1 else arr, photometric="minisblack")
        return fg
    elif kind == "float01":
        arr = fg.astype(np.float32)
    elif kind == "palette_white_background":
        im = Image.fromarray(fg.astype(np.uint8), mode="L").convert("P")
        im.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
        im.putdata(fg.astype(np.uint8).ravel().tolist())
        im.save(path)
        return fg
    elif kind == "rgb_colour":
        arr = np.where(fg[..., None], np.array([220, 30, 90], np.uint8), np.uint8(0)).astype(np.uint8)
    elif kind == "rgba_transparent":  # white but fully transparent background
        arr = np.where(fg[..., None], np.array([220, 30, 90, 255], np.uint8), np.array([255, 255, 255, 0], np.uint8))
        arr = arr.astype(np.uint8)
    elif kind == "gray_alpha":
        Image.fromarray(np.stack([fg.astype(np.uint8) * 255, np.full((h, w), 255, np.uint8)], -1), mode="LA").save(path)
        return fg
    else:  # pragma: no cover
        raise AssertionError(kind)
    if spec.mask_format == "png":
        Image.fromarray(arr).save(path)
    else:
        tifffile.imwrite(path, arr, photometric="minisblack" if arr.ndim == 2 else "rgb")
    return fg


def write_csv(spec: FolderSpec, path: Path, rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=spec.csv_delimiter, lineterminator="\r\n")
    if spec.csv_header:
        writer.writerow(["name", "label"])
    writer.writerows(rows)
    encoding = "latin-1" if spec.fault == "csv_latin1" else spec.csv_encoding
    path.write_bytes(buf.getvalue().encode(encoding))


def build(spec: FolderSpec, root: Path) -> dict:
    """Write the folders; return what a correct reader must see, or which file it must name."""
    images, masks = root / "images", root / "masks"
    expected: dict = {"images": images, "masks": masks, "labels_csv": None, "pairs": {}, "names": None}
    for i, pair in enumerate(spec.pairs):
        sub = pair.label if spec.labels_from == "subfolders" else ""
        (images / sub).mkdir(parents=True, exist_ok=True)
        (masks / sub).mkdir(parents=True, exist_ok=True)
        image_path = images / sub / f"{pair.name}.{pair.image_format}"
        mask_path = masks / sub / f"{pair.name}.{pair.mask_format}"
        image, how = write_image(pair, image_path)
        shape = (pair.size[0] + 1, pair.size[1]) if spec.fault == "size_mismatch" and i == spec.fault_index else None
        mask = write_mask(pair, mask_path, shape)
        label = pair.label if spec.labels_from != "none" else "nuclei"
        expected["pairs"][pair.name] = {"image": image, "how": how, "mask": mask, "label": label,
                                        "image_path": image_path, "mask_path": mask_path}

    fault, k = spec.fault, spec.pairs[spec.fault_index]
    target = expected["pairs"][k.name]
    names = None
    if fault == "size_mismatch":
        names = [target["mask_path"]]
    elif fault == "missing_mask":
        target["mask_path"].unlink()
        names = [target["image_path"]] + ([masks] if len(spec.pairs) == 1 else [])  # the only mask: empty folder
    elif fault == "orphan_mask":
        names = [masks / "zz orphan.png"]
        Image.fromarray(np.zeros((3, 3), np.uint8)).save(names[0])
    elif fault == "truncated_image":
        data = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(data, format="PNG")
        target["image_path"].unlink()
        target["image_path"] = target["image_path"].with_suffix(".png")
        target["image_path"].write_bytes(data.getvalue()[:40])
        names = [target["image_path"]]
    elif fault == "garbage_mask":
        target["mask_path"].write_bytes(b"this is not an image")
        names = [target["mask_path"]]
    elif fault in ("nan_image", "z_stack"):
        target["image_path"].unlink()
        target["image_path"] = target["image_path"].with_suffix(".tif")
        h, w = k.size
        if fault == "nan_image":
            values = np.zeros((h, w), np.float32)
            values[0, 0] = np.nan
            tifffile.imwrite(target["image_path"], values)
        else:
            tifffile.imwrite(target["image_path"], np.zeros((3, h, w), np.uint8), photometric="minisblack")
        names = [target["image_path"]]
    elif fault == "fractional_mask":
        target["mask_path"].unlink()
        target["mask_path"] = target["mask_path"].with_suffix(".tif")
        tifffile.imwrite(target["mask_path"], np.full(k.size, 0.5, np.float32))
        names = [target["mask_path"]]
    elif fault == "same_folder":
        expected["masks"] = images
        names = [images]
    elif fault == "all_empty":
        for p in spec.pairs:
            k_mask = expected["pairs"][p.name]["mask_path"]
            k_mask.unlink()
            k_mask = k_mask.with_suffix(".png")
            Image.fromarray(np.zeros(p.size, np.uint8)).save(k_mask)
            expected["pairs"][p.name]["mask_path"] = k_mask
        names = [expected["pairs"][p.name]["mask_path"] for p in spec.pairs]

    if spec.labels_from == "csv":
        csv_path = root / "labels.csv"
        rows = [(f"{p.name}.{p.image_format}" if spec.csv_names_with_suffix else p.name, p.label) for p in spec.pairs]
        if fault == "csv_unknown_name":
            rows.append(("ghost", "bright"))
        elif fault == "csv_missing_name":
            rows.pop(spec.fault_index)
        elif fault == "csv_two_labels":
            rows.append((rows[spec.fault_index][0], rows[spec.fault_index][1] + "2"))
        elif fault == "csv_latin1":
            rows[spec.fault_index] = (rows[spec.fault_index][0], "Färbung")
        write_csv(spec, csv_path, rows)
        if fault == "png_as_csv":
            csv_path = root / "labels.png"
            Image.fromarray(np.zeros((2, 2), np.uint8)).save(csv_path)
        expected["labels_csv"] = csv_path
        if fault in CSV_FAULTS:
            names = [csv_path]

    if names is None:  # no injected fault: data that is wrong as a whole is still refused
        binaries = [p["mask"] for p in expected["pairs"].values()]
        if all(not m.any() for m in binaries) or all(m.all() for m in binaries):
            names = [p["mask_path"] for p in expected["pairs"].values()]
    expected["names"] = names
    return expected


# ----------------------------------------------------------------------------- checking outcomes


def check_image(got: np.ndarray, want: np.ndarray, how: str) -> None:
    assert got.dtype == np.uint8 and got.shape == (*want.shape[:2], 3)
    if how == "exact":
        np.testing.assert_array_equal(got, want)
    elif how == "close":
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 12
    else:  # 16-bit and float are stretched: the order of values must survive
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
        order = np.argsort(want.ravel(), kind="stable")
        assert (np.diff(got[..., 0].ravel()[order].astype(int)) >= 0).all()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_case_name_problem(expected: dict) -> list[Path] | None:
    """Stems that nnU-Net case names cannot keep apart: `import` must refuse them, naming the files."""
    seen: dict[str, Path] = {}
    for stem, pair in expected["pairs"].items():
        key = _safe(stem).lower()
        if key in seen:
            return [seen[key], pair["image_path"]]
        seen[key] = pair["image_path"]
    return None


@given(folder_specs())
def test_any_input_folder_is_read_exactly_or_refused_naming_the_file(spec: FolderSpec) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        expected = build(spec, root / "in")
        names = expected["names"]
        inputs = snapshot(root / "in")

        # 1. the library: the samples as written, or IngestError naming the file
        try:
            samples = load_pairs(expected["images"], expected["masks"], expected["labels_csv"])
        except IngestError as exc:
            assert names is not None, f"refused good input: {exc}"
            assert any(p.name in str(exc) for p in names), f"{exc} names none of {[p.name for p in names]}"
            samples = None
        else:
            assert names is None, f"accepted bad input; expected an error naming {[p.name for p in names]}"
            assert sorted(s.name for s in samples) == sorted(expected["pairs"])
            for s in samples:
                want = expected["pairs"][s.name]
                check_image(s.image, want["image"], want["how"])
                np.testing.assert_array_equal(s.binary_mask, want["mask"].astype(np.uint8))
                assert s.label == want["label"]

        # 2. the command line: exit 0 with the same data in nnU-Net's layout, or exit 2 and no write
        raw = root / "raw"
        raw.mkdir()
        args = ["import", "--images", str(expected["images"]), "--masks", str(expected["masks"]),
                "--into", str(raw / "Dataset501_Fuzz")]
        if expected["labels_csv"] is not None:
            args += ["--labels", str(expected["labels_csv"])]
        result = runner.invoke(app, args)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        text = " ".join(result.output.split())
        collision = expected_case_name_problem(expected) if samples is not None else None
        if samples is None or collision:
            assert result.exit_code == 2, result.output
            assert text.startswith("error:") and "Traceback" not in text
            assert any(" ".join(str(p.name).split()) in text for p in (names or collision)), text
            assert list(raw.iterdir()) == []  # nothing written
        else:
            assert result.exit_code == 0, result.output
            dataset = raw / "Dataset501_Fuzz"
            dj = json.loads((dataset / "dataset.json").read_text())
            assert dj["numTraining"] == len(samples)
            recorded = json.loads((dataset / "pathar_aug_labels.json").read_text())
            for s in samples:
                case = _safe(s.name)
                np.testing.assert_array_equal(np.asarray(Image.open(dataset / "imagesTr" / f"{case}_0000.png")), s.image)
                np.testing.assert_array_equal(np.asarray(Image.open(dataset / "labelsTr" / f"{case}.png")), s.binary_mask)
                assert recorded[case] == s.label
            assert not list(dataset.rglob("*.tmp"))
        assert snapshot(root / "in") == inputs  # the user's files are never changed
