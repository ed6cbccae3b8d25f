"""Anomaly map -> pixel mask -> connected regions, plus the PNGs that travel in result entries.

Regions are what operators and PLC adapters act on ("defect at x, y, this big, this sure"); the
mask and the heat map (levels with the threshold at 128, ``pipeline.core.heatmap``) travel with
anomalous results, and the levels also draw the overlay. Work happens at model resolution by
default (cheap, the map's native detail); at frame resolution the map is resized first, so boxes
are in source-frame pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.core.heatmap import encode_levels
from pipeline.core.wire import Region


@dataclass(frozen=True)
class PostProcessed:
    regions: list[Region]
    map_h: int
    map_w: int
    mask_png: bytes | None
    heatmap_png: bytes | None
    levels: np.ndarray | None = None  # the heat map's uint8 levels (what heatmap_png encodes)


def postprocess(
    anomaly_map: np.ndarray,
    threshold: float,
    *,
    frame_size: tuple[int, int] | None = None,
    with_images: bool = True,
    find: bool = True,
    max_regions: int = 64,
) -> PostProcessed:
    """Threshold one map [H, W] (raw score units); ``frame_size`` = (h, w) resizes it first.

    ``find=False`` and ``with_images=False`` (a normal frame: nothing reaches the threshold)
    skip all work and only report the map size.
    """
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be [H, W], got shape {amap.shape}")
    if not find and not with_images:
        h, w = frame_size if frame_size is not None else amap.shape
        return PostProcessed([], int(h), int(w), None, None)
    if frame_size is not None and (amap.shape[0], amap.shape[1]) != tuple(frame_size):
        amap = cv2.resize(amap, (frame_size[1], frame_size[0]), interpolation=cv2.INTER_LINEAR)
    amap = np.nan_to_num(amap, nan=0.0, posinf=np.finfo(np.float32).max, neginf=0.0)
    mask = (amap >= threshold).astype(np.uint8)
    regions = find_regions(amap, mask, max_regions) if find else []
    mask_png = heatmap_png = levels = None
    if with_images:
        mask_png = encode_png(mask * 255)
        levels = encode_levels(amap, threshold)
        heatmap_png = encode_png(levels)
    return PostProcessed(regions, amap.shape[0], amap.shape[1], mask_png, heatmap_png, levels)


def find_regions(amap: np.ndarray, mask: np.ndarray, max_regions: int = 64) -> list[Region]:
    """8-connected regions of ``mask`` with box, area, peak and mean map value; worst first."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return []
    inside = labels > 0
    label_of_px = labels[inside]
    values = amap[inside].astype(np.float64)
    peaks = np.full(count, -np.inf)
    np.maximum.at(peaks, label_of_px, values)
    sums = np.bincount(label_of_px, weights=values, minlength=count)
    regions = [
        Region(
            x=int(stats[i, cv2.CC_STAT_LEFT]),
            y=int(stats[i, cv2.CC_STAT_TOP]),
            w=int(stats[i, cv2.CC_STAT_WIDTH]),
            h=int(stats[i, cv2.CC_STAT_HEIGHT]),
            area=int(stats[i, cv2.CC_STAT_AREA]),
            peak=float(peaks[i]),
            mean=float(sums[i] / stats[i, cv2.CC_STAT_AREA]),
        )
        for i in range(1, count)
    ]
    regions.sort(key=lambda r: r.peak, reverse=True)
    return regions[:max_regions]


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"could not encode a PNG of shape {img.shape}")
    return buf.tobytes()
