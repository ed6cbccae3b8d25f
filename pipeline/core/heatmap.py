"""The heat-map convention of the line and the overlay drawn from it, in one place.

A result's ``heatmap`` PNG holds the anomaly map as uint8 *levels* scaled to the model's
threshold: ``HEATMAP_THRESHOLD_LEVEL`` (128) is the threshold, 255 twice it, so heat maps and
overlays look alike across models whatever their raw score range. ``encode_levels`` writes that
scale (worker post-processing), ``level_fraction`` reads it back as a fraction of the threshold,
and ``render_overlay`` blends the levels over the frame (transparent well below the threshold,
strongest above it) and draws the region boxes. The worker draws the overlay of an anomalous
frame while the decoded frame is still in memory; the publisher only copies it into the alarm.

``models.predict`` keeps its own overlay for ``efficientad predict`` (normalised-score colours
and a mask contour, on files): the ML core may not import the pipeline, and the two pictures
answer different questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from pipeline.core.wire import Region

__all__ = [
    "HEATMAP_THRESHOLD_LEVEL",
    "OVERLAY_MAX_ALPHA",
    "encode_levels",
    "fit_longest_side",
    "level_fraction",
    "render_overlay",
]

#: heat-map level that equals the threshold (255 = 2x the threshold)
HEATMAP_THRESHOLD_LEVEL = 128
#: the heat map never hides more than this of the frame under it
OVERLAY_MAX_ALPHA = 0.75


def encode_levels(amap: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 levels of an anomaly map (raw score units) with the threshold at 128.

    A model without a positive threshold (never in practice) is scaled to its own maximum.
    """
    scale = HEATMAP_THRESHOLD_LEVEL / threshold if threshold > 0 else 255.0 / max(amap.max(), 1e-6)
    return np.clip(amap * scale, 0, 255).astype(np.uint8)


def level_fraction(levels: np.ndarray) -> np.ndarray:
    """float32 fraction of the threshold per pixel (1.0 = at the threshold, 2.0 at 255)."""
    return levels.astype(np.float32) / HEATMAP_THRESHOLD_LEVEL


def fit_longest_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (area filter) to a longest side of at most ``max_side``; never enlarged."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def render_overlay(
    frame_bgr: np.ndarray,
    levels: np.ndarray,
    regions: Sequence[Region],
    map_size: tuple[int, int],
    quality: int = 85,
) -> bytes:
    """JPEG of the frame with the heat map blended in where it matters and region boxes drawn.

    ``levels`` (any size) is stretched over the frame; ``regions`` are in ``map_size`` = (h, w)
    pixels and scaled to the frame, so a downscaled frame gets correctly placed boxes.
    """
    h, w = frame_bgr.shape[:2]
    levels = cv2.resize(levels, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    # transparent at half the threshold and below, strongest above the threshold
    alpha = np.clip(level_fraction(levels) - 0.5, 0.0, OVERLAY_MAX_ALPHA)[..., None]
    blended = (frame_bgr * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    sx, sy = w / max(map_size[1], 1), h / max(map_size[0], 1)
    thickness = max(1, round(min(w, h) / 200))
    for region in regions:
        top_left = (int(region.x * sx), int(region.y * sy))
        bottom_right = (int((region.x + region.w) * sx) - 1, int((region.y + region.h) * sy) - 1)
        cv2.rectangle(blended, top_left, bottom_right, (0, 0, 255), thickness)
    ok, buf = cv2.imencode(".jpg", blended, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("could not encode the overlay JPEG")
    return buf.tobytes()
