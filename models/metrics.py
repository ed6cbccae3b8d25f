"""Anomaly-detection metrics: image AUROC, F1, pixel AUROC and AU-PRO.

All metrics are exact (no binning): ties count one half, as in scikit-learn's ``roc_auc_score``
and the Mann-Whitney U statistic. The pixel metrics never hold more than one chunk of maps plus
the defective pixels in memory, so ``maps`` may be a ``np.memmap`` of thousands of maps:

- pixel AUROC = sum over normal pixels v of (#defect pixels > v + 0.5 #defect pixels == v),
  divided by (#defect * #normal). Defect-pixel values are sorted once; normal pixels stream
  through ``searchsorted`` chunk by chunk.
- AU-PRO follows the MVTec AD evaluation code (Bergmann et al.): ground-truth regions are the
  8-connected components of each mask; PRO(t) is the mean over all regions of the fraction of the
  region's pixels scoring >= t; FPR(t) the fraction of normal pixels scoring >= t; the curve has one
  point per distinct score (plus (0, 0)), is integrated with the trapezoidal rule up to the FPR
  limit, interpolating linearly at the limit, and is divided by the limit. The integral is the
  same sum as the AUROC with defect pixels weighted 1 / (region size * number of regions), taken
  over the normal pixels above the limit; the exact score at which FPR crosses the limit is found
  with a 65,536-bin histogram followed by an exact pass over the one bin that contains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

_HISTOGRAM_BINS = 1 << 16
DEFAULT_CHUNK = 32


def _as_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    return scores, labels.astype(bool)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via average ranks (ties count one half)."""
    scores, positive = _as_binary(scores, labels)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both good (0) and defective (1) samples")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    average_rank = upper - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@dataclass(frozen=True)
class ThresholdStats:
    """Binary classification at ``threshold`` (defective when score >= threshold)."""

    threshold: float
    f1: float
    precision: float
    recall: float
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def _f1(tp: np.ndarray | int, fp: np.ndarray | int, fn: np.ndarray | int) -> np.ndarray:
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(denominator), where=denominator > 0)


def stats_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> ThresholdStats:
    """Counts, precision, recall and F1 when scores >= threshold are called defective.

    Precision is 0 when nothing is called defective, recall 0 when there is no defective sample.
    """
    scores, positive = _as_binary(scores, labels)
    predicted = scores >= threshold
    tp = int(np.sum(predicted & positive))
    fp = int(np.sum(predicted & ~positive))
    fn = int(np.sum(~predicted & positive))
    tn = int(np.sum(~predicted & ~positive))
    return ThresholdStats(
        threshold=float(threshold),
        f1=float(_f1(tp, fp, fn)),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        true_negatives=tn,
    )


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Highest F1 over all thresholds and the threshold reaching it.

    Candidate thresholds are the distinct scores (defective when score >= threshold); among equal
    F1 values the lowest threshold wins, as with anomalib's F1AdaptiveThreshold.
    """
    scores, positive = _as_binary(scores, labels)
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one defective (1) sample")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(positive[order])
    fp = np.cumsum(~positive[order])
    last_of_group = np.append(np.diff(sorted_scores) != 0, True)
    tp, fp, thresholds = tp[last_of_group], fp[last_of_group], sorted_scores[last_of_group]
    f1 = _f1(tp, fp, n_pos - tp)
    best = np.flatnonzero(f1 == f1.max())[-1]  # thresholds descend: last == lowest
    return float(f1[best]), float(thresholds[best])


# ---------------------------------------------------------------------------------------------
# Pixel metrics


@dataclass(frozen=True)
class PixelMetrics:
    auroc: float
    au_pro: float
    fpr_limit: float
    n_defect_pixels: int
    n_normal_pixels: int
    n_regions: int


class _DefectPixels:
    """Sorted defect-pixel scores with prefix sums of their AUROC and PRO weights."""

    def __init__(self, values: np.ndarray, pro_weights: np.ndarray, n_regions: int) -> None:
        order = np.argsort(values, kind="stable")
        self.values = values[order]
        self.count_prefix = np.arange(values.size + 1, dtype=np.float64)
        self.pro_prefix = np.concatenate([[0.0], np.cumsum(pro_weights[order] / n_regions)])

    def contributions(self, normal: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """Per normal pixel: weight of defect pixels above it plus half the weight tied with it."""
        right = np.searchsorted(self.values, normal, side="right")
        result = prefix[-1] - prefix[right]
        # ties are rare with real-valued maps: look for the left edge only where there is one
        tied = np.flatnonzero(self.values[np.maximum(right - 1, 0)] == normal)
        tied = tied[right[tied] > 0]
        if tied.size:
            left = np.searchsorted(self.values, normal[tied], side="left")
            result[tied] += 0.5 * (prefix[right[tied]] - prefix[left])
        return result


def _check_shapes(maps: np.ndarray, masks: np.ndarray) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"maps and masks must both be [N, H, W] of the same shape, got {maps.shape} and "
            f"{masks.shape}"
        )
    if maps.shape[0] == 0:
        raise ValueError("no maps given")


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, max(1, chunk))


def _read_chunk(maps: np.ndarray, masks: np.ndarray, start: int, chunk: int):
    # float32 maps stay float32: comparisons are exact in the maps' own precision
    dtype = np.result_type(maps.dtype, np.float32)
    values = np.asarray(maps[start : start + chunk], dtype=dtype)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"anomaly maps {start}..{start + len(values) - 1} contain NaN or infinity")
    return values, np.asarray(masks[start : start + chunk], dtype=bool)


def _bin_index(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.int64)
    scaled = (values - low) * (_HISTOGRAM_BINS / (high - low))
    return np.clip(scaled.astype(np.int64), 0, _HISTOGRAM_BINS - 1)


def pixel_metrics(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, chunk: int = DEFAULT_CHUNK
) -> PixelMetrics:
    """Pixel AUROC and AU-PRO (MVTec method, FPR up to ``fpr_limit``) over all pixels.

    ``maps``: float [N, H, W] anomaly maps; ``masks``: bool [N, H, W] ground truth (good images
    have all-False masks). Three streaming passes over the maps, exact results.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"FPR limit must be in (0, 1], got {fpr_limit}")
    _check_shapes(maps, masks)
    n_images = maps.shape[0]

    # pass 1: defect pixels with region weights; count and range of normal pixels
    defect_values: list[np.ndarray] = []
    defect_weights: list[np.ndarray] = []
    n_regions = 0
    n_normal = 0
    low, high = math.inf, -math.inf
    for start in _chunks(n_images, chunk):
        values, truth = _read_chunk(maps, masks, start, chunk)
        for value, gt in zip(values, truth, strict=True):
            normal = value[~gt]
            n_normal += normal.size
            if normal.size:
                low, high = min(low, float(normal.min())), max(high, float(normal.max()))
            if not gt.any():
                continue
            count, labels, stats, _ = cv2.connectedComponentsWithStats(
                gt.astype(np.uint8), connectivity=8
            )
            region_of_pixel = labels[gt]
            defect_values.append(value[gt])
            defect_weights.append(1.0 / stats[region_of_pixel, cv2.CC_STAT_AREA])
            n_regions += count - 1
    n_defect = int(sum(v.size for v in defect_values))
    if n_defect == 0 or n_normal == 0:
        raise ValueError("pixel metrics need both defective and normal pixels in the masks")
    defect = _DefectPixels(np.concatenate(defect_values), np.concatenate(defect_weights), n_regions)
    del defect_values, defect_weights

    # pass 2: AUROC sum over all normal pixels, histogram of normal scores
    auroc_sum = 0.0
    histogram = np.zeros(_HISTOGRAM_BINS, dtype=np.int64)
    for start in _chunks(n_images, chunk):
        values, truth = _read_chunk(maps, masks, start, chunk)
        normal = values[~truth]
        auroc_sum += float(defect.contributions(normal, defect.count_prefix).sum())
        histogram += np.bincount(_bin_index(normal, low, high), minlength=_HISTOGRAM_BINS)
    auroc = auroc_sum / (n_defect * n_normal)

    # pass 3: PRO area of the normal pixels above the FPR limit, exact inside the crossing bin
    limit_count = fpr_limit * n_normal  # normal pixels allowed above threshold (real number)
    if abs(limit_count - round(limit_count)) <= 1e-9 * max(1.0, limit_count):
        limit_count = float(round(limit_count))  # 0.3 * 10 is 3, not 3.0000000000000004
    k = max(1, math.ceil(limit_count))
    from_top = np.cumsum(histogram[::-1])
    crossing_bin = _HISTOGRAM_BINS - 1 - int(np.searchsorted(from_top, k))
    area_sum = 0.0
    above_count = 0
    bin_values: list[np.ndarray] = []
    bin_counts: list[np.ndarray] = []
    for start in _chunks(n_images, chunk):
        values, truth = _read_chunk(maps, masks, start, chunk)
        normal = values[~truth]
        bins = _bin_index(normal, low, high)
        higher = normal[bins > crossing_bin]
        above_count += higher.size
        area_sum += float(defect.contributions(higher, defect.pro_prefix).sum())
        unique, counts = np.unique(normal[bins == crossing_bin], return_counts=True)
        bin_values.append(unique)
        bin_counts.append(counts)
    unique, inverse = np.unique(np.concatenate(bin_values), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(bin_counts)).astype(np.int64)
    area = area_sum
    for value, count in zip(unique[::-1], counts[::-1], strict=True):
        contribution = float(defect.contributions(np.array([value]), defect.pro_prefix)[0])
        if above_count + count < limit_count:
            area += count * contribution
            above_count += count
            continue
        # the curve crosses the limit inside this tie group: interpolate along its segment
        fraction = (limit_count - above_count) / count
        right = np.searchsorted(defect.values, value, side="right")
        left = np.searchsorted(defect.values, value, side="left")
        pro_before = defect.pro_prefix[-1] - defect.pro_prefix[right]
        pro_tied = defect.pro_prefix[right] - defect.pro_prefix[left]
        pro_at_limit = pro_before + pro_tied * fraction
        area += (limit_count - above_count) * 0.5 * (pro_before + pro_at_limit)
        break
    au_pro = area / n_normal / fpr_limit
    return PixelMetrics(
        auroc=float(auroc),
        au_pro=float(min(au_pro, 1.0)),
        fpr_limit=fpr_limit,
        n_defect_pixels=n_defect,
        n_normal_pixels=n_normal,
        n_regions=n_regions,
    )


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, chunk: int = DEFAULT_CHUNK) -> float:
    """Exact AUROC over all pixels of all maps (see ``pixel_metrics``)."""
    return pixel_metrics(maps, masks, 1.0, chunk).auroc


def au_pro(
    maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, chunk: int = DEFAULT_CHUNK
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD method)."""
    return pixel_metrics(maps, masks, fpr_limit, chunk).au_pro
