"""The heat-map convention (128 = threshold) and the overlay drawn from it."""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.core.heatmap import (
    HEATMAP_THRESHOLD_LEVEL,
    encode_levels,
    fit_longest_side,
    level_fraction,
    render_overlay,
)
from pipeline.core.wire import Region


def test_levels_put_the_threshold_at_128_and_read_back_as_fractions() -> None:
    amap = np.array([[0.0, 0.25, 0.5, 1.0, 5.0]], np.float32)
    levels = encode_levels(amap, threshold=0.5)
    assert levels.dtype == np.uint8
    assert levels.tolist() == [[0, 64, HEATMAP_THRESHOLD_LEVEL, 255, 255]]  # 2x and more: 255
    assert level_fraction(levels).tolist() == [[0.0, 0.5, 1.0, 255 / 128, 255 / 128]]


def test_overlay_keeps_the_frame_below_half_the_threshold_and_boxes_regions() -> None:
    frame = np.full((48, 64, 3), 100, np.uint8)
    levels = np.zeros((16, 16), np.uint8)
    levels[4:8, 4:8] = 255  # twice the threshold
    box = Region(x=10, y=10, w=4, h=4, area=16, peak=2.0, mean=2.0)  # away from the heat
    jpeg = render_overlay(frame, levels, [box], (16, 16), quality=95)
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(int)
    assert image.shape == (48, 64, 3)
    assert np.abs(image[40:, :20] - 100).max() <= 3  # untouched, JPEG noise only
    hot = image[12:24, 16:32]  # levels 255: blended toward the colour map
    assert np.abs(hot - 100).mean() > 30
    edge = image[30, 40:56]  # the box's top edge: map (10, 10) -> frame (x 40, y 30)
    assert (edge[:, 2] - edge[:, 0]).mean() > 40  # red over the grey


def test_fit_longest_side_only_shrinks() -> None:
    big = np.zeros((1080, 1920, 3), np.uint8)
    assert fit_longest_side(big, 1280).shape == (720, 1280, 3)
    small = np.zeros((48, 64, 3), np.uint8)
    assert fit_longest_side(small, 1280) is small
