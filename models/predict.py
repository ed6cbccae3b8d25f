"""Score image files with a trained model; optionally save raw maps and heat-map overlays.

Outputs per image: ``MAPS/<name>.npy`` (float32 anomaly map at the model's input size, raw score
units: the image score is its maximum) and ``OVERLAYS/<name>.png`` (the image at its original size
with the heat map blended in and the thresholded region outlined). ``<name>`` is the file stem;
when several inputs share a stem, the second gets ``-2``, the third ``-3`` and so on, in input
order. An unreadable image is reported with its error and does not stop the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from models.data import DataError, is_image_file, list_images, load_rgb

if TYPE_CHECKING:
    from models.inference import InferenceEngine, ModelInfo

OVERLAY_ALPHA = 0.45
CONTOUR_COLOR_RGB = (255, 255, 255)


@dataclass
class ImagePrediction:
    path: str
    score: float | None = None
    normalized: float | None = None
    anomalous: bool | None = None
    width: int | None = None
    height: int | None = None
    map_path: str | None = None
    overlay_path: str | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.error is not None:
            return "error"
        return "anomalous" if self.anomalous else "good"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def collect_images(inputs: Iterable[Path], recursive: bool = False) -> list[Path]:
    """Expand files and folders into image paths (folders sorted); DataError for missing ones."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = list_images(item, recursive=recursive)
            if not found:
                raise DataError(f"folder {item} contains no images")
            paths.extend(found)
        elif item.is_file():
            if not is_image_file(item):
                raise DataError(f"{item} does not have an image file extension")
            paths.append(item)
        else:
            raise DataError(f"{item} does not exist")
    return paths


def output_names(paths: Sequence[Path]) -> list[str]:
    """File stems made unique in input order: ``a``, ``a-2``, ``a-3`` (never another stem)."""
    stems = {p.stem for p in paths}
    used: set[str] = set()
    names = []
    for path in paths:
        name, count = path.stem, 1
        while name in used or (count > 1 and name in stems):
            count += 1
            name = f"{path.stem}-{count}"
        used.add(name)
        names.append(name)
    return names


def heat_overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, info: ModelInfo) -> np.ndarray:
    """RGB uint8 image at its own size with the map blended in and the anomalous region outlined.

    Colours follow the normalised score: (map - threshold) / (score_max - score_min) + 0.5,
    clipped to [0, 1], so the threshold is the middle of the colour scale (green in JET).
    """
    height, width = image_rgb.shape[:2]
    resized = cv2.resize(
        anomaly_map.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    span = float(info.score_max - info.score_min)
    span = span if span > 0 else 1.0
    level = np.clip((resized - info.threshold) / span + 0.5, 0.0, 1.0)
    heat_bgr = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image_rgb, 1.0 - OVERLAY_ALPHA, heat, OVERLAY_ALPHA, 0.0)
    region = (resized >= info.threshold).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(min(height, width) / 256))
    cv2.drawContours(blended, contours, -1, CONTOUR_COLOR_RGB, thickness, cv2.LINE_AA)
    return blended


def _write_png_rgb(path: Path, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def predict_paths(
    engine: InferenceEngine,
    paths: Sequence[Path],
    maps_dir: Path | None = None,
    overlay_dir: Path | None = None,
    batch_size: int = 8,
) -> list[ImagePrediction]:
    """Predict every path; results in input order, failures carry ``error``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for folder in (maps_dir, overlay_dir):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    results = [ImagePrediction(path=str(p)) for p in paths]
    for start in range(0, len(paths), batch_size):
        indices, images = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                images.append(load_rgb(paths[i]))
                indices.append(i)
            except DataError as exc:
                results[i].error = str(exc)
        if not images:
            continue
        prediction = engine.predict_images(images)
        for j, i in enumerate(indices):
            result = results[i]
            result.height, result.width = images[j].shape[:2]
            result.score = float(prediction.scores[j])
            result.normalized = float(prediction.normalized[j])
            result.anomalous = bool(prediction.anomalous[j])
            anomaly_map = np.asarray(prediction.maps[j], dtype=np.float32)
            if maps_dir is not None:
                target = Path(maps_dir) / f"{names[i]}.npy"
                np.save(target, anomaly_map)
                result.map_path = str(target)
            if overlay_dir is not None:
                target = Path(overlay_dir) / f"{names[i]}.png"
                _write_png_rgb(target, heat_overlay(images[j], anomaly_map, engine.info))
                result.overlay_path = str(target)
    return results


def format_predictions(results: Sequence[ImagePrediction]) -> str:
    """Plain table: raw score, normalised score, label, path."""
    lines = [f"{'score':>12} {'normalized':>10}  {'label':<9}  path"]
    for r in results:
        if r.error is not None:
            lines.append(f"{'-':>12} {'-':>10}  {'error':<9}  {r.path}: {r.error}")
        else:
            lines.append(f"{r.score:>12.5g} {r.normalized:>10.3f}  {r.label:<9}  {r.path}")
    return "\n".join(lines)
