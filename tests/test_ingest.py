
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from pathar_aug.ingest import IngestError, load_pairs, read_image, read_mask
from pathar_aug.patches import dihedral, make_patches, split_by_image, tile_sample
from tests.conftest import DEMO, write_pair_folders


# ----- each file format loads -----
@pytest.mark.parametrize("suffix,mode", [(s, m) for s in (".png", ".tif", ".tiff", ".jpg") for m in ("gray", "rgb", "rgba")
                                         if not (s == ".jpg" and m == "rgba")])  # JPEG holds no alpha
def test_image_formats_load_as_rgb_uint8(tmp_path, suffix, mode):
    rng = np.random.default_rng(0)
    arr = {"gray": rng.integers(0, 255, (20, 30)), "rgb": rng.integers(0, 255, (20, 30, 3)),
           "rgba": rng.integers(0, 255, (20, 30, 4))}[mode].astype(np.uint8)
    path = tmp_path / f"im{suffix}"
    if suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if suffix != ".jpg":
        expected = np.repeat(arr[..., None], 3, -1) if mode == "gray" else arr[..., :3]
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_stretched_to_uint8(tmp_path, suffix):
    arr = np.linspace(1000, 5000, 20 * 30).reshape(20, 30).astype(np.uint16)
    path = tmp_path / f"im16{suffix}"
    tifffile.imwrite(path, arr) if suffix == ".tif" else Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    assert out.min() <= 2 and out.max() >= 253  # the used range is spread over 0..255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)  # order preserved


def test_masks_binary_any_nonzero_and_instance_ids_kept(tmp_path):
    binary = np.zeros((10, 10), np.uint8)
    binary[2:5, 2:5] = 255
    Image.fromarray(binary).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), (binary > 0).astype(np.int32))
    inst = np.zeros((10, 10), np.uint16)
    inst[1:3, 1:3], inst[5:8, 5:8] = 1, 7
    tifffile.imwrite(tmp_path / "i.tif", inst)
    out = read_mask(tmp_path / "i.tif")
    assert set(np.unique(out)) == {0, 1, 7}


def test_demo_data_loads_with_folder_labels():
    samples = load_pairs(DEMO / "images", DEMO / "masks")
    assert {s.label for s in samples} == {"fluorescence", "histology", "brightfield"}
    assert all(s.image.shape[:2] == s.mask.shape for s in samples)


def test_label_csv(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=3)
    csv = tmp_path / "labels.csv"
    csv.write_text("name,label\ncase000.png,a\ncase001,b\ncase002,a\n")
    labels = {s.name: s.label for s in load_pairs(images, masks, csv)}
    assert labels == {"case000": "a", "case001": "b", "case002": "a"}


# ----- each bad input raises a clear error naming the file -----
def test_image_without_mask(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    (masks / "case001.png").unlink()
    with pytest.raises(IngestError, match="case001.png: image has no mask"):
        load_pairs(images, masks)


def test_mask_without_image(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    (images / "case001.png").unlink()
    with pytest.raises(IngestError, match="case001.png: mask has no image"):
        load_pairs(images, masks)


def test_size_mismatch(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks / "case001.png")
    with pytest.raises(IngestError, match="case001.png: mask size 12x10 differs"):
        load_pairs(images, masks)


def test_truncated_file(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    data = (images / "case000.png").read_bytes()
    (images / "case000.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match="case000.png: cannot read file"):
        load_pairs(images, masks)


def test_unreadable_file(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    (masks / "case001.png").write_text("not an image")
    with pytest.raises(IngestError, match="case001.png: cannot read file"):
        load_pairs(images, masks)


def test_empty_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(IngestError, match="no image files found"):
        load_pairs(tmp_path / "images", tmp_path / "masks")


def test_missing_folder(tmp_path):
    with pytest.raises(IngestError, match="image folder does not exist"):
        load_pairs(tmp_path / "nope", tmp_path / "masks")


def test_label_csv_with_unknown_file(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("name,label\ncase000,a\ncase001,b\nghost,a\n")
    with pytest.raises(IngestError, match="labels.csv: row 4 names 'ghost'"):
        load_pairs(images, masks, csv)


def test_label_csv_missing_a_file(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("name,label\ncase000,a\n")
    with pytest.raises(IngestError, match="no label for image 'case001'"):
        load_pairs(images, masks, csv)


# ----- patches -----
def test_split_by_source_image_never_shares_a_source():
    samples = load_pairs(DEMO / "images", DEMO / "masks")
    train, val = split_by_image(samples, 0.25, seed=1)
    assert {s.name for s in train}.isdisjoint({s.name for s in val})
    assert {s.label for s in val} == {s.label for s in train}
    tp = make_patches(train, 128)
    vp = make_patches(val, 128, tp.label_names)
    assert set(tp.sources).isdisjoint(vp.sources)


def test_tiles_cover_the_image_and_small_images_pad_or_refuse(tmp_path):
    images, masks = write_pair_folders(tmp_path, n=1, size=50)
    sample = load_pairs(images, masks)[0]
    tiles = tile_sample(sample, 32)
    assert len(tiles) == 4 and all(t[0].shape == (32, 32, 3) for t in tiles)
    padded = tile_sample(sample, 64)
    assert len(padded) == 1 and padded[0][1][50:].sum() == 0
    with pytest.raises(IngestError, match="smaller than the patch size"):
        tile_sample(sample, 64, pad_small=False)


def test_dihedral_group_has_eight_distinct_elements():
    x = torch.arange(9).reshape(1, 3, 3)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
