"""Evaluate a trained model on the test split of a dataset.

Maps are compared with the ground truth at the model's input size (masks are resized with exact
nearest-neighbour sampling, see ``models.data.load_mask``). Image metrics use the raw score (the
maximum of the anomaly map). Per defect type, that type's images are scored against all good test
images. Pixel metrics use all good images plus the defective images that have masks; a type
without masks gets image metrics only. Large test sets keep their maps in a temporary memory-mapped
file, so evaluation runs in bounded memory.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.data import AnomalyDataset, DataError, Sample, load_mask, load_rgb
from models.metrics import ThresholdStats, best_f1, image_auroc, pixel_metrics, stats_at_threshold

if TYPE_CHECKING:
    from models.inference import InferenceEngine

IN_MEMORY_LIMIT_BYTES = 512 * 1024 * 1024


@dataclass
class MetricSet:
    """Metrics of one subset of the test images (all of them, or one defect type + good)."""

    n_good: int
    n_defective: int
    image_auroc: float | None = None
    image_f1: float | None = None
    image_f1_threshold: float | None = None
    pixel_auroc: float | None = None
    au_pro: float | None = None
    at_model_threshold: ThresholdStats | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at_model_threshold"] = (
            self.at_model_threshold.to_dict() if self.at_model_threshold else None
        )
        return out


@dataclass
class ImageResult:
    path: str
    defect_type: str
    label: int
    score: float
    normalized: float
    anomalous: bool


@dataclass
class EvalReport:
    model: dict[str, Any]
    dataset: dict[str, Any]
    fpr_limit: float
    overall: MetricSet
    per_type: dict[str, MetricSet]
    images: list[ImageResult]
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dataset": self.dataset,
            "fpr_limit": self.fpr_limit,
            "overall": self.overall.to_dict(),
            "per_type": {name: m.to_dict() for name, m in self.per_type.items()},
            "images": [asdict(i) for i in self.images],
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
        }

    def to_text(self) -> str:
        """Human-readable summary table."""
        model, data = self.model, self.dataset
        lines = [
            f"model   {model['name']} {model['version']} (weights sha256 {model['sha256'][:12]}), "
            f"input {model['image_size'][0]}x{model['image_size'][1]}, "
            f"threshold {model['threshold']:.5g}",
            f"dataset {data['name']} ({data['layout']} layout, {data['n_test']} test images, "
            f"fingerprint {data['fingerprint'][:12]}) at {data['root']}",
            "",
        ]
        header = (
            f"{'subset':<16}{'good':>6}{'defect':>8}{'I-AUROC':>9}{'I-F1':>7}{'@thr':>9}"
            f"{'F1':>7}{'Prec':>7}{'Rec':>7}{'P-AUROC':>9}{'AU-PRO':>8}"
        )
        lines += [header, "-" * len(header)]
        rows = [("overall", self.overall), *sorted(self.per_type.items())]
        for name, m in rows:
            at = m.at_model_threshold
            lines.append(
                f"{name[:15]:<16}{m.n_good:>6}{m.n_defective:>8}{_fmt(m.image_auroc):>9}"
                f"{_fmt(m.image_f1):>7}{_fmt(m.image_f1_threshold, '.4g'):>9}"
                f"{_fmt(at and at.f1):>7}{_fmt(at and at.precision):>7}{_fmt(at and at.recall):>7}"
                f"{_fmt(m.pixel_auroc):>9}{_fmt(m.au_pro):>8}"
            )
        lines += [
            "",
            "I-AUROC/I-F1: image level, I-F1 at its optimal threshold (@thr, raw score); F1/Prec/"
            "Rec: at the model's stored threshold;",
            f"P-AUROC: pixel AUROC; AU-PRO: up to FPR {self.fpr_limit:g}, normalised. "
            f"{len(self.images)} images in {self.seconds:.1f} s ({self.images_per_second:.1f}/s).",
        ]
        for name, m in rows:
            lines += [f"note ({name}): {note}" for note in m.notes]
        return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


class _Rows:
    """Read-only row subset of an [N, H, W] array that loads only the rows a slice asks for."""

    def __init__(self, base: np.ndarray, rows: np.ndarray) -> None:
        self.base, self.rows = base, rows
        self.shape = (len(rows), *base.shape[1:])
        self.ndim, self.dtype = base.ndim, base.dtype

    def __getitem__(self, item: slice) -> np.ndarray:
        return self.base[self.rows[item]]


def _batches(samples: Sequence[Sample], batch_size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), batch_size):
        yield list(samples[start : start + batch_size])


def _prefetched(
    samples: Sequence[Sample], batch_size: int, size: tuple[int, int]
) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Decode the next batch (images and masks) in a thread while the model runs this one."""

    def load(batch: list[Sample]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        masks = [
            load_mask(s, size)
            if s.mask_path is not None or s.label == 0
            else np.zeros(size, dtype=bool)
            for s in batch
        ]
        return [load_rgb(s.path) for s in batch], masks

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-loader") as pool:
        pending: Future | None = None
        for batch in _batches(samples, batch_size):
            future = pool.submit(load, batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def _image_metrics(
    metrics: MetricSet, scores: np.ndarray, labels: np.ndarray, threshold: float
) -> None:
    if metrics.n_defective:
        metrics.at_model_threshold = stats_at_threshold(scores, labels, threshold)
        metrics.image_f1, metrics.image_f1_threshold = best_f1(scores, labels)
    if metrics.n_good and metrics.n_defective:
        metrics.image_auroc = image_auroc(scores, labels)
    elif not metrics.n_good:
        metrics.notes.append("no good test images: image AUROC undefined")
    else:
        metrics.notes.append("no defective test images: AUROC and F1 undefined")
        metrics.at_model_threshold = stats_at_threshold(scores, labels, threshold)


def _pixel_metrics(
    metrics: MetricSet,
    maps: np.ndarray,
    masks: np.ndarray,
    rows: np.ndarray,
    fpr_limit: float,
) -> None:
    if not rows.size:
        return
    try:
        result = pixel_metrics(_Rows(maps, rows), _Rows(masks, rows), fpr_limit)
    except ValueError as exc:
        metrics.notes.append(f"pixel metrics unavailable: {exc}")
        return
    metrics.pixel_auroc, metrics.au_pro = result.auroc, result.au_pro


def evaluate(
    engine: InferenceEngine,
    dataset: AnomalyDataset,
    batch_size: int = 8,
    fpr_limit: float = 0.3,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Run ``engine`` over ``dataset.test`` and compute image and pixel metrics."""
    samples = list(dataset.test)
    if not samples:
        raise DataError(f"{dataset.root}: no test images to evaluate on")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    info = engine.info
    height, width = (int(v) for v in info.image_size)
    n = len(samples)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efficientad-eval-") as workdir:
        if n * height * width * 5 > IN_MEMORY_LIMIT_BYTES:
            maps = np.lib.format.open_memmap(
                Path(workdir) / "maps.npy", "w+", np.float32, (n, height, width)
            )
            masks = np.lib.format.open_memmap(
                Path(workdir) / "masks.npy", "w+", np.bool_, (n, height, width)
            )
        else:
            maps = np.empty((n, height, width), np.float32)
            masks = np.empty((n, height, width), bool)
        scores = np.empty(n, np.float64)
        normalized = np.empty(n, np.float64)
        anomalous = np.empty(n, bool)
        done = 0
        for images, batch_masks in _prefetched(samples, batch_size, (height, width)):
            prediction = engine.predict_images(images)
            end = done + len(images)
            if prediction.maps.shape[1:] != (height, width):
                raise RuntimeError(
                    f"engine returned maps of shape {prediction.maps.shape[1:]}, expected "
                    f"{(height, width)} (its image_size)"
                )
            maps[done:end] = prediction.maps
            masks[done:end] = np.stack(batch_masks)
            scores[done:end] = prediction.scores
            normalized[done:end] = prediction.normalized
            anomalous[done:end] = prediction.anomalous
            done = end
            if progress is not None:
                progress(done, n)

        labels = np.array([s.label for s in samples])
        types = np.array([s.defect_type for s in samples])
        has_truth = np.array([s.label == 0 or s.mask_path is not None for s in samples])
        good = labels == 0

        overall = MetricSet(n_good=int(good.sum()), n_defective=int((~good).sum()))
        _image_metrics(overall, scores, labels, info.threshold)
        _pixel_metrics(overall, maps, masks, np.flatnonzero(has_truth), fpr_limit)
        if not has_truth.all():
            missing = sorted(set(types[~has_truth]))
            overall.notes.append(f"pixel metrics leave out types without masks: {missing}")

        per_type: dict[str, MetricSet] = {}
        for defect_type in dataset.defect_types:
            subset = good | (types == defect_type)
            m = MetricSet(n_good=int(good.sum()), n_defective=int((types == defect_type).sum()))
            _image_metrics(m, scores[subset], labels[subset], info.threshold)
            if has_truth[types == defect_type].all():
                _pixel_metrics(m, maps, masks, np.flatnonzero(subset), fpr_limit)
            else:
                m.notes.append("no ground-truth masks: pixel metrics unavailable")
            per_type[defect_type] = m
        del maps, masks
    seconds = time.perf_counter() - started

    results = [
        ImageResult(
            path=_relative(s.path, dataset.root),
            defect_type=s.defect_type,
            label=s.label,
            score=float(scores[i]),
            normalized=float(normalized[i]),
            anomalous=bool(anomalous[i]),
        )
        for i, s in enumerate(samples)
    ]
    return EvalReport(
        model={
            "name": info.name,
            "version": info.version,
            "sha256": info.sha256,
            "image_size": [height, width],
            "threshold": float(info.threshold),
        },
        dataset={
            "root": str(dataset.root),
            "name": dataset.name,
            "layout": dataset.layout,
            "fingerprint": dataset.fingerprint(),
            "n_test": n,
            "defect_types": dataset.defect_types,
        },
        fpr_limit=fpr_limit,
        overall=overall,
        per_type=per_type,
        images=results,
        seconds=seconds,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
