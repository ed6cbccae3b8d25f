"""Synthetic line images: determinism, visible and well-labelled defects, datasets, line streams."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data import discover_dataset, load_mask
from pipeline.tools.scene import (
    DEFECT_TYPES,
    LineEpisode,
    generate_mvtec,
    line_frames,
    plan_episodes,
    render_part,
    write_line,
)


def test_render_part_is_deterministic_per_seed():
    a, ma = render_part(np.random.default_rng(3), (256, 256), "crack")
    b, mb = render_part(np.random.default_rng(3), (256, 256), "crack")
    c, _ = render_part(np.random.default_rng(4), (256, 256), "crack")
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [(256, 256), (320, 384), (512, 512)])
def test_render_part_shapes(size):
    image, mask = render_part(np.random.default_rng(0), size, "spot")
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert mask.shape == size and mask.dtype == bool and mask.any()
    _good, good_mask = render_part(np.random.default_rng(0), size, None)
    assert not good_mask.any()


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_visible_and_exactly_where_the_mask_says(defect):
    """The same seed renders the same part with and without the defect: the pixels that differ
    are the labelled ones (plus optics blur and, for a chip, the changed shadow next to it)."""
    for seed in range(4):
        good, _ = render_part(np.random.default_rng(seed), (256, 256), None)
        bad, mask = render_part(np.random.default_rng(seed), (256, 256), defect)
        diff = np.abs(good.astype(int) - bad.astype(int)).max(axis=2)
        assert 60 <= mask.sum() <= 0.05 * mask.size, f"{defect} mask of {mask.sum()} px"
        assert diff[mask].mean() > 25, f"{defect} barely visible: {diff[mask].mean():.1f}"
        # soft edges and blur reach ~3 px; a chip also changes the shadow up to ~20 px away
        reach = 24 if defect == "missing" else 4
        distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
        assert distance[diff > 0].max() <= reach, "pixels far from the mask changed"


def test_normal_parts_vary_but_stay_in_view():
    images = [render_part(np.random.default_rng(s), (256, 256))[0] for s in range(12)]
    stack = np.stack(images).astype(np.float32)
    assert stack.std(axis=0).mean() > 8  # position, rotation, belt, lighting, noise
    for image in images:
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        bright = grey[30:226] > 120  # metal is much brighter than the belt
        ys, xs = np.nonzero(bright)
        assert 80 < xs.mean() < 176 and 70 < ys.mean() + 30 < 186


def test_render_is_fast():
    rng = np.random.default_rng(0)
    render_part(rng, (512, 512), "scratch")  # warm the belt and grid caches
    started = time.perf_counter()
    for i in range(10):
        render_part(rng, (512, 512), (None, *DEFECT_TYPES)[i % 5])
    per_image = (time.perf_counter() - started) / 10
    assert per_image < 0.15, f"{per_image * 1000:.0f} ms per 512x512 image"  # ~35 ms unloaded


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown defect"):
        render_part(np.random.default_rng(0), (256, 256), "dent")
    with pytest.raises(ValueError, match="at least 64"):
        render_part(np.random.default_rng(0), (32, 256))


def test_generate_mvtec_layout_and_reuse(tmp_path: Path):
    category = generate_mvtec(tmp_path, "flange", 3, 2, 1, size=(128, 128), seed=5)
    assert category == tmp_path / "flange"
    ds = discover_dataset(category)
    assert len(ds.train) == 3
    assert sorted(ds.defect_types) == sorted(DEFECT_TYPES)
    assert sum(s.label == 0 for s in ds.test) == 2
    for sample in ds.test:
        if sample.label:
            raw = cv2.imread(str(sample.mask_path), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(raw)) == {0, 255}
            assert load_mask(sample, (128, 128)).any()
    info = json.loads((category / "synth.json").read_text())
    assert info["seed"] == 5 and info["n_train"] == 3

    first = (category / "train" / "good" / "000.png").stat().st_mtime_ns
    assert generate_mvtec(tmp_path, "flange", 3, 2, 1, size=(128, 128), seed=5) == category
    assert (category / "train" / "good" / "000.png").stat().st_mtime_ns == first  # reused
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_mvtec(tmp_path, "flange", 4, 2, 1, size=(128, 128), seed=5)
    generate_mvtec(tmp_path, "flange", 4, 2, 1, size=(128, 128), seed=5, overwrite=True)
    assert len(discover_dataset(category).train) == 4


def test_generate_mvtec_images_do_not_depend_on_other_counts(tmp_path: Path):
    a = generate_mvtec(tmp_path / "a", "c", 2, 1, 1, size=(96, 96), seed=1)
    b = generate_mvtec(tmp_path / "b", "c", 5, 3, 2, size=(96, 96), seed=1)
    for rel in ("train/good/001.png", "test/good/000.png", "test/crack/000.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_plan_episodes():
    episodes = plan_episodes(300, 5, 4, 8, 10, seed=3)
    assert episodes == plan_episodes(300, 5, 4, 8, 10, seed=3)
    assert len(episodes) == 5
    assert episodes[0].start >= 10 and episodes[-1].end <= 300 - 10
    for prev, nxt in itertools.pairwise(episodes):
        assert nxt.start - prev.end >= 10
    assert all(4 <= e.length <= 8 and e.defect in DEFECT_TYPES for e in episodes)
    assert {e.defect for e in plan_episodes(400, 8, 2, 3, 5, seed=0)} == set(DEFECT_TYPES)
    assert plan_episodes(10, 0, 1, 1, 0, seed=0) == []
    with pytest.raises(ValueError, match="need"):
        plan_episodes(30, 3, 5, 8, 5, seed=0)


def test_line_frames_follow_the_episodes():
    episodes = [LineEpisode(5, 3, "scratch"), LineEpisode(13, 6, "missing")]
    frames = list(line_frames(24, episodes, (256, 256), seed=9, frames_per_part=4))
    assert [f[0] for f in frames] == list(range(24))
    for index, frame, mask, defect in frames:
        assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
        expected = next((e.defect for e in episodes if e.start <= index < e.end), None)
        assert defect == expected
        assert (mask is not None) == (expected is not None)
        if mask is not None:
            assert mask.any()
    again = list(line_frames(24, episodes, (256, 256), seed=9, frames_per_part=4))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(frames, again, strict=True))


def test_line_parts_move_with_the_belt_and_episodes_start_new_parts():
    episodes = [LineEpisode(4, 4, "spot")]
    frames = list(line_frames(8, episodes, (256, 256), seed=2, frames_per_part=4))
    centroids = [np.nonzero(m)[1].mean() for _, _, m, _ in frames[4:8]]
    steps = np.diff(centroids)
    assert np.allclose(steps, 0.12 * 256 / 3, atol=1.5)  # constant belt speed to the right
    # consecutive frames of one pass differ (moving belt), a new pass shows another part
    assert not np.array_equal(frames[0][1], frames[1][1])


def test_line_frames_reject_bad_episodes():
    with pytest.raises(ValueError, match="overlaps"):
        list(line_frames(20, [LineEpisode(2, 5, "spot"), LineEpisode(4, 2, "crack")]))
    with pytest.raises(ValueError, match="does not fit"):
        list(line_frames(10, [LineEpisode(8, 5, "spot")]))
    with pytest.raises(ValueError, match="unknown defect"):
        list(line_frames(10, [LineEpisode(1, 2, "dent")]))


def test_write_line(tmp_path: Path):
    out = write_line(tmp_path / "line", 6, [LineEpisode(2, 2, "crack")], (128, 128), seed=1)
    assert len(list((out / "frames").glob("*.png"))) == 6
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == ["000002.png", "000003.png"]
    labels = json.loads((out / "labels.json").read_text())
    assert [f["defect"] for f in labels["frames"]] == [None, None, "crack", "crack", None, None]
    capture = cv2.VideoCapture(str(out / "line.avi"))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    assert count == 6
