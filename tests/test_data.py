"""Dataset discovery, splitting and image loading on real image files written by the tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from models.data import (
    DataError,
    Sample,
    discover_dataset,
    list_images,
    load_batch,
    load_mask,
    load_rgb,
    mvtec_categories,
    split_train_validation,
    to_tensor,
)


def write_image(path: Path, value: int = 128, shape=(40, 48, 3), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    image = np.clip(rng.normal(value, 20, shape), 0, np.iinfo(dtype).max).astype(dtype)
    assert cv2.imwrite(str(path), image)
    return path


def write_mask(path: Path, box=(5, 5, 15, 15), shape=(40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = 255
    assert cv2.imwrite(str(path), mask)
    return path


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    root = tmp_path / "bottle"
    for i in range(5):
        write_image(root / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        write_image(root / "test" / "good" / f"{i:03d}.png")
    for kind in ("crack", "scratch"):
        for i in range(2):
            write_image(root / "test" / kind / f"{i:03d}.png", value=200)
            write_mask(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "good" / ".hidden.png")
    return root


def test_discover_mvtec_layout(mvtec_root: Path):
    ds = discover_dataset(mvtec_root)
    assert ds.layout == "mvtec"
    assert ds.name == "bottle"
    assert [s.path.name for s in ds.train] == [f"{i:03d}.png" for i in range(5)]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in ds.train)
    assert len(ds.test) == 7
    assert ds.defect_types == ["crack", "scratch"]
    defective = [s for s in ds.test if s.label == 1]
    assert len(defective) == 4
    for s in defective:
        assert (
            s.mask_path == mvtec_root / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
        )
    assert sum(s.label == 0 for s in ds.test) == 3


def test_mask_named_like_the_image_is_accepted(tmp_path: Path):
    root = tmp_path / "cat"
    write_image(root / "train" / "good" / "a.png")
    write_image(root / "test" / "hole" / "x.png")
    write_mask(root / "ground_truth" / "hole" / "x.png")
    (sample,) = [s for s in discover_dataset(root).test if s.label == 1]
    assert sample.mask_path == root / "ground_truth" / "hole" / "x.png"


def test_defect_type_without_masks_is_allowed_partial_masks_are_not(tmp_path: Path):
    root = tmp_path / "cat"
    write_image(root / "train" / "good" / "a.png")
    write_image(root / "test" / "dent" / "0.png")
    write_image(root / "test" / "dent" / "1.png")
    ds = discover_dataset(root)
    assert [s.mask_path for s in ds.test] == [None, None]
    write_mask(root / "ground_truth" / "dent" / "0_mask.png")
    with pytest.raises(DataError, match=r"1 of 2 images have no mask.*1_mask\.png"):
        discover_dataset(root)


def test_fingerprint_tracks_content_not_mtime_or_location(mvtec_root: Path):
    first = discover_dataset(mvtec_root).fingerprint()
    copy = mvtec_root.parent / "elsewhere" / "bottle"
    shutil.copytree(mvtec_root, copy)
    assert discover_dataset(copy).fingerprint() == first  # relative paths only
    target = mvtec_root / "train" / "good" / "000.png"
    os.utime(target, (1_000_000, 1_000_000))
    assert discover_dataset(mvtec_root).fingerprint() == first
    write_image(target, shape=(60, 48, 3))
    assert discover_dataset(mvtec_root).fingerprint() != first
    (copy / "test" / "crack" / "001.png").rename(copy / "test" / "crack" / "009.png")
    (copy / "ground_truth" / "crack" / "001_mask.png").rename(
        copy / "ground_truth" / "crack" / "009_mask.png"
    )
    assert discover_dataset(copy).fingerprint() != first


def test_discover_errors(tmp_path: Path, mvtec_root: Path):
    with pytest.raises(DataError, match="does not exist"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        discover_dataset(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        discover_dataset(empty)
    with pytest.raises(DataError, match=r"several MVTec categories.*bottle"):
        discover_dataset(tmp_path)
    assert [p.name for p in mvtec_categories(tmp_path)] == ["bottle", "empty"]
    stray = tmp_path / "stray"
    stray.mkdir()
    with pytest.raises(DataError, match="not a dataset"):
        discover_dataset(stray)


def test_folder_layout(tmp_path: Path):
    root = tmp_path / "line"
    for i in range(10):
        write_image(root / "good" / f"g{i}.jpg")
    for i in range(3):
        write_image(root / "dent" / f"d{i}.png", value=220)
        write_mask(root / "masks" / "dent" / f"d{i}_mask.png")
    write_image(root / "smudge" / "s0.png", value=30)
    ds = discover_dataset(root)
    assert ds.layout == "folder"
    assert ds.defect_types == ["dent", "smudge"]
    test_good = [s for s in ds.test if s.label == 0]
    assert len(test_good) == 2 and len(ds.train) == 8  # 20 % of good images
    assert {s.path for s in ds.train}.isdisjoint({s.path for s in test_good})
    dents = [s for s in ds.test if s.defect_type == "dent"]
    assert all(s.mask_path is not None for s in dents)
    assert [s.mask_path for s in ds.test if s.defect_type == "smudge"] == [None]
    assert discover_dataset(root).test == ds.test  # deterministic


def test_folder_layout_without_defects_trains_on_everything(tmp_path: Path):
    for i in range(4):
        write_image(tmp_path / "good" / f"{i}.png")
    ds = discover_dataset(tmp_path)
    assert len(ds.train) == 4 and ds.test == []


def test_split_train_validation_is_deterministic_and_order_free():
    samples = [Sample(Path(f"/d/{i:02d}.png"), 0, "good") for i in range(20)]
    train, val = split_train_validation(samples, 0.1, seed=42)
    assert len(val) == 2 and len(train) == 18
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(samples)
    assert split_train_validation(list(reversed(samples)), 0.1, seed=42) == (train, val)
    assert split_train_validation(samples, 0.1, seed=7)[1] != val
    assert split_train_validation(samples[:3], 0.1)[1]  # at least one validation image
    assert split_train_validation(samples[:1], 0.5) == (samples[:1], [])
    assert split_train_validation(samples, 0.0) == (samples, [])
    with pytest.raises(ValueError):
        split_train_validation(samples, 1.0)


def test_list_images(tmp_path: Path):
    write_image(tmp_path / "b.PNG")
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "sub" / "c.bmp")
    (tmp_path / "readme.md").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.bmp"]
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_load_rgb_converts_channels(tmp_path: Path):
    bgr = np.zeros((10, 12, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    rgb = load_rgb(tmp_path / "red.png")
    assert rgb.shape == (10, 12, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == 255).all() and (rgb[..., 1:] == 0).all()

    grey = write_image(tmp_path / "grey.png", shape=(10, 12))
    loaded = load_rgb(grey)
    assert loaded.shape == (10, 12, 3)
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()

    rgba = np.full((8, 8, 4), 200, np.uint8)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    assert load_rgb(tmp_path / "rgba.png").shape == (8, 8, 3)

    deep = np.full((8, 8), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    as_rgb = load_rgb(tmp_path / "deep.png")
    assert as_rgb.dtype == np.uint8 and (as_rgb == 255).all()


def test_load_rgb_applies_exif_orientation(tmp_path: Path):
    from PIL import Image  # only to write a JPEG with an EXIF orientation tag

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    picture.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").shape == (40, 20, 3)


def test_load_rgb_errors_name_the_file(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_rgb(broken)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png"):
        load_rgb(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"missing\.png"):
        load_rgb(tmp_path / "missing.png")


def test_load_mask(tmp_path: Path):
    mask_path = write_mask(tmp_path / "m.png", box=(10, 12, 30, 36), shape=(40, 48))
    sample = Sample(tmp_path / "x.png", 1, "dent", mask_path)
    full = load_mask(sample, (40, 48))
    assert full.dtype == bool and full.sum() == 20 * 24
    half = load_mask(sample, (20, 24))
    assert half.shape == (20, 24) and set(np.unique(half)) == {False, True}
    assert half.sum() == 10 * 12
    assert not load_mask(Sample(tmp_path / "g.png", 0, "good"), (7, 9)).any()
    with pytest.raises(DataError, match="no ground-truth mask"):
        load_mask(Sample(tmp_path / "d.png", 1, "dent"), (7, 9))


def test_to_tensor_matches_torchvision_antialiased_resize(tmp_path: Path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    tensor = to_tensor(image, (256, 256))
    assert tensor.shape == (3, 256, 256) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    reference = TF.resize(
        torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, [256, 256], antialias=True
    )
    assert torch.allclose(tensor, reference.clamp(0, 1), atol=1e-5)
    same = to_tensor(image[:256, :256], (256, 256))
    assert torch.equal(same, torch.from_numpy(image[:256, :256]).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        to_tensor(image[..., 0], (256, 256))


def test_load_batch(mvtec_root: Path):
    ds = discover_dataset(mvtec_root)
    batch = load_batch(ds.train[:3], (64, 64))
    assert batch.shape == (3, 3, 64, 64)
