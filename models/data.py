"""Finding, splitting and loading anomaly-detection image datasets.

Two on-disk layouts are accepted (``discover_dataset`` tells them apart by their folders):

``mvtec`` (MVTec AD, one category per root)::

    ROOT/train/good/*.png                       normal training images (required, non-empty)
    ROOT/test/good/*                            normal test images
    ROOT/test/<defect_type>/*                   defective test images
    ROOT/ground_truth/<defect_type>/<stem>_mask.png   masks, 0 = normal, 255 = defect
                                                (``<stem>.png`` is accepted as well)

``folder`` (a plain folder of labelled images)::

    ROOT/good/*                                 normal images (required, non-empty)
    ROOT/<defect_type>/*                        defective images (any other sub-folder)
    ROOT/masks/<defect_type>/<stem>_mask.png    optional masks (or ``<stem>.png``)

  With at least one defect folder, a deterministic ``normal_test_fraction`` (default 20 %) of
  the good images becomes normal test data and the rest is training data; without defect folders
  every good image is training data and the test set is empty.

Masks are optional per defect type: a type either has a mask for every image or none (its images
then count for image metrics only). A type with some masks missing is an error, because that is
almost always a copying mistake that would silently skew pixel metrics. Mask pixels > 127 are
defective. Image files: .png .jpg .jpeg .bmp .tif .tiff .webp (case-insensitive); hidden files are
ignored. Grey, 16-bit and RGBA images are converted to 8-bit RGB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
GOOD = "good"
MASKS_FOLDER = "masks"
MASK_THRESHOLD = 127


class DataError(ValueError):
    """A dataset or image on disk is missing, empty, malformed or unreadable."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None


@dataclass
class AnomalyDataset:
    root: Path
    layout: Literal["mvtec", "folder"]
    train: list[Sample]
    test: list[Sample]
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.root.name

    @property
    def defect_types(self) -> list[str]:
        """Defect types of the test set, sorted."""
        return sorted({s.defect_type for s in self.test if s.label == 1})

    def fingerprint(self) -> str:
        """sha256 over split, relative path and byte size of every image and mask (not mtimes).

        Identifies the data a model was trained or evaluated on without hashing gigabytes.
        """
        digest = hashlib.sha256()
        digest.update(f"layout={self.layout}\n".encode())
        for split, samples in (("train", self.train), ("test", self.test)):
            for sample in samples:
                for path in (sample.path, sample.mask_path):
                    if path is None:
                        continue
                    rel = _relative(path, self.root)
                    digest.update(f"{split}\t{rel}\t{_file_size(path)}\n".encode())
        return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted by path); DataError if the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(mask_dir: Path, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        candidate = mask_dir / name
        if candidate.is_file():
            return candidate
    return None


def _defect_samples(images: list[Path], defect_type: str, mask_dir: Path) -> list[Sample]:
    """Defective samples of one type, with masks for all of them or for none."""
    masks = [_find_mask(mask_dir, image) for image in images] if mask_dir.is_dir() else []
    found = [m for m in masks if m is not None]
    if found and len(found) != len(images):
        missing = [img for img, m in zip(images, masks, strict=True) if m is None]
        raise DataError(
            f"defect type {defect_type!r}: {len(missing)} of {len(images)} images have no mask in "
            f"{mask_dir} (expected e.g. {mask_dir / (missing[0].stem + '_mask.png')}); "
            "provide a mask for every image of the type or for none"
        )
    if not found:
        masks = [None] * len(images)
    return [Sample(img, 1, defect_type, m) for img, m in zip(images, masks, strict=True)]


def _load_mvtec(root: Path) -> AnomalyDataset:
    train_images = list_images(root / "train" / GOOD)
    if not train_images:
        raise DataError(f"{root / 'train' / GOOD} contains no images")
    train = [Sample(p, 0, GOOD) for p in train_images]
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for type_dir in _subfolders(test_dir):
            images = list_images(type_dir)
            if type_dir.name == GOOD:
                test.extend(Sample(p, 0, GOOD) for p in images)
            elif images:
                mask_dir = root / "ground_truth" / type_dir.name
                test.extend(_defect_samples(images, type_dir.name, mask_dir))
    return AnomalyDataset(root=root, layout="mvtec", train=train, test=test)


def _load_folder(root: Path, normal_test_fraction: float, seed: int) -> AnomalyDataset:
    good_images = list_images(root / GOOD)
    if not good_images:
        raise DataError(f"{root / GOOD} contains no images")
    defective: list[Sample] = []
    for type_dir in _subfolders(root):
        if type_dir.name in (GOOD, MASKS_FOLDER):
            continue
        images = list_images(type_dir)
        if images:
            mask_dir = root / MASKS_FOLDER / type_dir.name
            defective.extend(_defect_samples(images, type_dir.name, mask_dir))
    good = [Sample(p, 0, GOOD) for p in good_images]
    if not defective:
        return AnomalyDataset(root=root, layout="folder", train=good, test=[])
    train, test_good = split_train_validation(good, normal_test_fraction, seed)
    return AnomalyDataset(root=root, layout="folder", train=train, test=test_good + defective)


def discover_dataset(
    root: Path, normal_test_fraction: float = 0.2, seed: int = 42
) -> AnomalyDataset:
    """Detect the layout of ``root`` (see module docstring) and list its samples."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    try:
        if (root / "train" / GOOD).is_dir():
            return _load_mvtec(root)
        if (root / GOOD).is_dir():
            return _load_folder(root, normal_test_fraction, seed)
        categories = [p.name for p in _subfolders(root) if (p / "train" / GOOD).is_dir()]
    except PermissionError as exc:
        raise DataError(f"cannot read {exc.filename}: permission denied") from exc
    if categories:
        raise DataError(
            f"{root} holds several MVTec categories ({', '.join(categories)}); "
            "pass one category folder"
        )
    raise DataError(
        f"{root} is not a dataset: expected {root / 'train' / GOOD} (MVTec layout) "
        f"or {root / GOOD} (folder layout)"
    )


def mvtec_categories(root: Path) -> list[Path]:
    """Category folders (those with train/good) directly below ``root``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    return [p for p in _subfolders(root) if (p / "train" / GOOD).is_dir()]


def split_train_validation(
    samples: Sequence[Sample], fraction: float = 0.1, seed: int = 42
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic random split; the result depends only on the set of paths, not their order.

    At least one sample goes to each side when there are two or more samples and 0 < fraction < 1.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    ordered = sorted(samples, key=lambda s: s.path.as_posix())
    n = len(ordered)
    n_val = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    elif n < 2:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(ordered) if i not in val_idx]
    val = [s for i, s in enumerate(ordered) if i in val_idx]
    return train, val


def _read(path: Path, flags: int) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist")
    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    image = cv2.imdecode(buffer, flags) if buffer.size else None
    if image is None:
        raise DataError(f"cannot decode {path}: not a supported or intact image file")
    return image


def load_rgb(path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB; grey, 16-bit and alpha images are converted, EXIF rotation applied."""
    bgr = _read(path, cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def load_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) defect mask; all False for good samples.

    Resized with exact nearest-neighbour sampling so masks stay binary and no label is invented.
    """
    height, width = size
    if sample.mask_path is None:
        if sample.label == 1:
            raise DataError(f"defective image {sample.path} has no ground-truth mask")
        return np.zeros((height, width), dtype=bool)
    mask = _read(sample.mask_path, cv2.IMREAD_GRAYSCALE)
    if mask.dtype != np.uint8:
        mask = (mask.astype(np.float64) / np.iinfo(mask.dtype).max * 255).astype(np.uint8)
    if mask.shape != (height, width):
        mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return mask > MASK_THRESHOLD


def to_tensor(img_rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """float32 [3, H, W] in [0, 1] at ``size`` = (H, W).

    Resized with torch bilinear interpolation, ``antialias=True``, ``align_corners=False``: the
    same resampling as torchvision's ``Resize(antialias=True)``, which anomalib and the reference
    EfficientAD code use, so models trained elsewhere see the pixels they were trained on.
    """
    if img_rgb.ndim != 3 or img_rgb.shape[2] != 3 or img_rgb.dtype != np.uint8:
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got shape {img_rgb.shape} dtype {img_rgb.dtype}"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(img_rgb)).permute(2, 0, 1).float().div_(255.0)
    if tuple(tensor.shape[1:]) != tuple(size):
        tensor = F.interpolate(
            tensor.unsqueeze(0),
            size=tuple(size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        ).squeeze(0)
        tensor.clamp_(0.0, 1.0)
    return tensor


def load_batch(samples: Sequence[Sample], size: tuple[int, int]) -> torch.Tensor:
    """float32 [B, 3, H, W] batch of samples at ``size`` (see ``to_tensor``)."""
    return torch.stack([to_tensor(load_rgb(s.path), size) for s in samples])
