"""Metrics against hand-computed values and brute-force references written independently."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from models.metrics import (
    au_pro,
    best_f1,
    image_auroc,
    pixel_auroc,
    pixel_metrics,
    stats_at_threshold,
)

# ----------------------------------------------------------------------------- references


def pairwise_auroc(scores, labels) -> float:
    """Probability that a random defective outranks a random good sample, ties one half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_f1(scores, labels):
    best = (-1.0, None)
    for t in sorted(set(scores)):  # ascending: keep the first (lowest) threshold of a tie
        tp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= t and y == 1)
        fp = sum(1 for s, y in zip(scores, labels, strict=True) if s >= t and y == 0)
        fn = sum(1 for s, y in zip(scores, labels, strict=True) if s < t and y == 1)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best[0] + 1e-15:
            best = (f1, t)
    return best


def flood_fill_regions(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components by breadth-first search (independent of OpenCV)."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        queue, region = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(region)
    return regions


def reference_au_pro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """PRO/FPR curve evaluated threshold by threshold, then clipped trapezoidal integration."""
    regions = [(i, region) for i in range(len(maps)) for region in flood_fill_regions(masks[i])]
    normal = maps[~masks]
    xs, ys = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        xs.append(float(np.mean(normal >= t)))
        overlaps = [np.mean([maps[i][y, x] >= t for y, x in region]) for i, region in regions]
        ys.append(float(np.mean(overlaps)))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(zip(xs, ys, strict=True)):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed: int, n: int = 5, size: int = 20, levels: int | None = 40):
    rng = np.random.default_rng(seed)
    maps = rng.normal(0, 1, (n, size, size))
    masks = np.zeros((n, size, size), bool)
    for i in range(1, n):  # image 0 is good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 5, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
        maps[i][masks[i]] += rng.uniform(0.5, 2.0)
    maps[:, :2, :] = 0.0  # a constant border band, like padded EfficientAD maps: many ties
    if levels is not None:
        maps = np.round(maps * levels / 8) / (levels / 8)  # coarse values: ties everywhere
    return maps.astype(np.float32), masks


# ----------------------------------------------------------------------------- image level


def test_image_auroc_hand_cases():
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert image_auroc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    assert image_auroc([0.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(1.0)
    assert image_auroc([2.0, 1.0, 0.0], [0, 1, 1]) == pytest.approx(0.0)


def test_image_auroc_matches_pairwise_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(4, 60))
        scores = np.round(rng.normal(0, 1, n), 1)
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        assert image_auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels))


def test_image_auroc_rejects_single_class_and_nan():
    with pytest.raises(ValueError, match="both"):
        image_auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="labels"):
        image_auroc([0.1, 0.2], [0, 2])


def test_best_f1_hand_case():
    f1, threshold = best_f1([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)
    assert best_f1([0.2, 0.9, 0.7], [0, 1, 1]) == (pytest.approx(1.0), pytest.approx(0.7))


def test_best_f1_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(3, 40))
        scores = np.round(rng.normal(0, 1, n), 1).tolist()
        labels = rng.integers(0, 2, n).tolist()
        labels[0] = 1
        f1, threshold = best_f1(scores, labels)
        ref_f1, ref_threshold = brute_force_f1(scores, labels)
        assert f1 == pytest.approx(ref_f1)
        assert threshold == pytest.approx(ref_threshold)


def test_stats_at_threshold_counts():
    stats = stats_at_threshold([0.1, 0.4, 0.35, 0.8, 0.5], [0, 0, 1, 1, 1], 0.4)
    assert (stats.true_positives, stats.false_positives) == (2, 1)
    assert (stats.false_negatives, stats.true_negatives) == (1, 1)
    assert stats.precision == pytest.approx(2 / 3)
    assert stats.recall == pytest.approx(2 / 3)
    assert stats.f1 == pytest.approx(2 / 3)
    nothing = stats_at_threshold([0.1, 0.2], [0, 1], 5.0)
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- pixel level


def test_pixel_metrics_hand_cases():
    maps = np.array([[[4.0, 3.0, 2.0, 1.0]]])
    masks = np.array([[[False, False, True, False]]])
    # one defect pixel (2) against normals 4, 3, 1: it beats one of three
    assert pixel_auroc(maps, masks) == pytest.approx(1 / 3)
    # curve (0,0) (1/3,0) (2/3,0) (2/3,1) (1,1): nothing below FPR 0.3, a third of the full area
    assert au_pro(maps, masks, 0.3) == pytest.approx(0.0)
    assert au_pro(maps, masks, 1.0) == pytest.approx(1 / 3)

    normal = np.linspace(1.0, 0.1, 10)
    maps = np.concatenate([normal, [0.95, 0.05]])[None, None, :]
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, 0, 10:] = True  # one region of two pixels: 0.95 and 0.05
    # PRO is 0.5 from FPR 0.1 on: area to 0.3 = 0.1, to 0.25 = 0.075 (interpolated limit)
    assert au_pro(maps, masks, 0.3) == pytest.approx(0.1 / 0.3)
    assert au_pro(maps, masks, 0.25) == pytest.approx(0.075 / 0.25)


def test_regions_weigh_equally_regardless_of_size():
    maps = np.zeros((1, 8, 8))
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0:4, 0:4] = True  # 16 px region, fully detected
    masks[0, 6, 6] = True  # 1 px region, missed
    maps[0, 0:4, 0:4] = 5.0
    maps[0, 6, 6] = -1.0
    # PRO is 0.5 (one of two regions) over the whole FPR range below 1
    assert au_pro(maps, masks, 0.3) == pytest.approx(0.5)
    # a diagonal neighbour is the same region under 8-connectivity
    masks[0, 4, 4] = True
    maps[0, 4, 4] = 5.0
    masks[0, 6, 6] = False
    assert au_pro(maps, masks, 0.3) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pixel_metrics_match_brute_force(seed, limit):
    maps, masks = random_case(seed, levels=None if seed == 3 else 40)
    expected_pro = reference_au_pro(maps.astype(np.float64), masks, limit)
    expected_auc = image_auroc(maps.ravel(), masks.ravel())
    for chunk in (1, 2, 64):
        result = pixel_metrics(maps, masks, limit, chunk=chunk)
        assert result.au_pro == pytest.approx(expected_pro, abs=1e-12)
        assert result.auroc == pytest.approx(expected_auc, abs=1e-12)
    assert result.n_defect_pixels == int(masks.sum())


@pytest.mark.parametrize("limit", [0.3, 0.01])
def test_pixel_metrics_exact_when_histogram_is_coarse(limit):
    """An extreme outlier squeezes all other scores into one histogram bin: the exact pass over
    the crossing bin must still give the reference value."""
    maps, masks = random_case(11)
    maps[0, 5, 5] = 1e9
    expected = reference_au_pro(maps.astype(np.float64), masks, limit)
    assert au_pro(maps, masks, limit, chunk=2) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_matches_pairwise_small():
    maps, masks = random_case(5, n=3, size=8)
    assert pixel_auroc(maps, masks) == pytest.approx(
        pairwise_auroc(maps.ravel().tolist(), masks.ravel().astype(int).tolist())
    )


def test_pixel_metrics_on_memmap(tmp_path):
    maps, masks = random_case(7, n=12, size=24)
    stored = np.lib.format.open_memmap(tmp_path / "maps.npy", "w+", np.float32, maps.shape)
    stored[:] = maps
    stored.flush()
    result = pixel_metrics(np.load(tmp_path / "maps.npy", mmap_mode="r"), masks, 0.3, chunk=5)
    assert result.au_pro == pytest.approx(reference_au_pro(maps.astype(np.float64), masks, 0.3))


def test_perfect_and_inverted_maps():
    masks = np.zeros((2, 16, 16), bool)
    masks[1, 4:8, 4:8] = True
    perfect = masks.astype(np.float32)
    assert pixel_metrics(perfect, masks).auroc == pytest.approx(1.0)
    assert pixel_metrics(perfect, masks).au_pro == pytest.approx(1.0)
    assert pixel_metrics(-perfect, masks).au_pro == pytest.approx(0.0)


def test_pixel_metrics_errors():
    masks = np.zeros((1, 4, 4), bool)
    with pytest.raises(ValueError, match="defective and normal"):
        pixel_metrics(np.zeros((1, 4, 4)), masks)
    with pytest.raises(ValueError, match="same shape"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), bool))
    masks[0, 0, 0] = True
    bad = np.zeros((1, 4, 4))
    bad[0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(bad, masks)
    with pytest.raises(ValueError, match="FPR limit"):
        pixel_metrics(np.zeros((1, 4, 4)), masks, fpr_limit=0.0)
