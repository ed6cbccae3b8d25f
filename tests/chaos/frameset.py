"""Frames for the chaos suite: a scored image pool, replay folders with alarm runs, and bombs.

The pool is rendered once per session (``pipeline.tools.scene.render_part``: normal parts and
parts with defects, 128x128) and scored in-process with the same ``InferenceEngine`` the workers
load. A copy of the model directory gets a threshold in the widest score gap, so the pool splits
into "high" (anomalous) and "low" (normal) images with a clear margin; replay folders then order
pool images so that high scores come in runs of 3-8 frames between normal runs, and alarms
really happen.

The frames are captured as PNG, so the worker scores exactly the pixels that were pre-scored here.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

POOL_SIZE = (128, 128)  # (h, w) of every frame; the model resizes to its own input size
POOL_NORMAL = 10
POOL_DEFECT = 10
MIN_SIDE = 4  # images needed on each side of the threshold


@dataclass
class FrameSet:
    """The scored pool plus the calibrated model copy; builds replay folders on demand."""

    root: Path
    model_dir: Path
    threshold: float
    scores: dict[str, float]  # pool file name -> raw score
    high: list[Path]
    low: list[Path]
    _folders: dict[tuple[int, int], Path] = field(default_factory=dict)

    def pattern(self, n: int, seed: int = 0) -> list[bool]:
        """Anomalous (True) / normal flags: normal runs of 3-6, anomalous runs of 3-8 frames,
        always starting and ending with a normal run of at least 3 (so every alarm can end)."""
        rng = random.Random(seed)
        flags: list[bool] = []
        while len(flags) < n - 4:
            flags += [False] * rng.randint(3, 6)
            flags += [True] * rng.randint(3, 8)
        flags = flags[: max(0, n - 3)]
        flags += [False] * (n - len(flags))
        return flags

    def folder(self, n: int, seed: int = 0) -> Path:
        """A folder of ``n`` PNG frames (sorted names) following ``pattern(n, seed)``; cached."""
        key = (n, seed)
        if key in self._folders:
            return self._folders[key]
        out = self.root / f"frames-{n}-s{seed}"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        flags = self.pattern(n, seed)
        hi = lo = 0
        for i, anomalous in enumerate(flags):
            if anomalous:
                src = self.high[hi % len(self.high)]
                hi += 1
            else:
                src = self.low[lo % len(self.low)]
                lo += 1
            shutil.copyfile(src, out / f"{i:05d}.png")
        (out / "pattern.json").write_text(json.dumps({"anomalous": flags}))
        self._folders[key] = out
        return out

    def image_bytes(self, anomalous: bool, index: int = 0) -> bytes:
        """PNG bytes (BGR, POOL_SIZE) of a pool image, for frames the tests XADD themselves."""
        pool = self.high if anomalous else self.low
        return pool[index % len(pool)].read_bytes()


def _render_pool(out: Path) -> list[Path]:
    from pipeline.tools.scene import DEFECT_TYPES, render_part

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(POOL_NORMAL + POOL_DEFECT):
        defect = None if i < POOL_NORMAL else DEFECT_TYPES[i % len(DEFECT_TYPES)]
        rng = np.random.default_rng([8, i])
        image, _ = render_part(rng, (256, 256), defect)
        small = cv2.resize(image, (POOL_SIZE[1], POOL_SIZE[0]), interpolation=cv2.INTER_AREA)
        path = out / f"pool-{i:02d}-{defect or 'good'}.png"
        if not cv2.imwrite(str(path), small):
            raise OSError(f"could not write {path}")
        paths.append(path)
    return paths


def _score(model_dir: Path, paths: list[Path]) -> list[float]:
    from models.inference import InferenceEngine

    engine = InferenceEngine.load(model_dir, device="cpu")
    scores: list[float] = []
    for start in range(0, len(paths), 4):
        images = []
        for path in paths[start : start + 4]:
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        scores += [float(s) for s in engine.predict_images(images).scores]
    return scores


def _split(scores: list[float]) -> tuple[float, float]:
    """Threshold in the widest gap that leaves MIN_SIDE images on each side; (threshold, gap)."""
    ordered = sorted(scores)
    best, gap = None, -1.0
    for i in range(MIN_SIDE, len(ordered) - MIN_SIDE + 1):
        width = ordered[i] - ordered[i - 1]
        if width > gap:
            best, gap = (ordered[i] + ordered[i - 1]) / 2.0, width
    if best is None:
        raise ValueError(f"need at least {2 * MIN_SIDE} pool images, got {len(scores)}")
    return best, gap


def build_frameset(model_dir: Path, root: Path) -> FrameSet:
    """Render and score the pool, write the calibrated model copy under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = _render_pool(root / "pool")
    scores = _score(Path(model_dir), paths)
    threshold, gap = _split(scores)
    scale = max(abs(threshold), 1e-6)
    if gap / scale < 1e-4:
        raise ValueError(
            f"pool scores are too close to split reliably (gap {gap:.3g} at {threshold:.6g}): "
            f"{sorted(scores)}"
        )
    model_copy = root / "model"
    if model_copy.exists():
        shutil.rmtree(model_copy)
    shutil.copytree(model_dir, model_copy)
    meta_path = model_copy / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["threshold"] = threshold
    meta["score_min"] = min(scores)
    meta["score_max"] = max(scores)
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    high = [p for p, s in zip(paths, scores, strict=True) if s > threshold]
    low = [p for p, s in zip(paths, scores, strict=True) if s < threshold]
    (root / "scores.json").write_text(
        json.dumps(
            {
                "threshold": threshold,
                "gap": gap,
                "scores": {p.name: s for p, s in zip(paths, scores, strict=True)},
            },
            indent=2,
        )
    )
    return FrameSet(
        root=root,
        model_dir=model_copy,
        threshold=threshold,
        scores={p.name: s for p, s in zip(paths, scores, strict=True)},
        high=high,
        low=low,
    )


# ------------------------------------------------------------------------------------------------
# bombs and junk


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A ~225-byte PNG whose IHDR declares ``width`` x ``height`` RGB (7.5 GB when decoded)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(150_000), 9)  # a few rows of zeros: the decoder wants far more
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int = 16_000, height: int = 16_000) -> bytes:
    """A ~600-byte baseline JPEG (really 16x16) whose SOF0 declares ``width`` x ``height``."""
    rng = np.random.default_rng(3)
    tile = rng.integers(96, 160, (16, 16, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, 60])
    if not ok:
        raise RuntimeError("OpenCV could not encode the JPEG tile")
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    if sof < 0:
        raise RuntimeError("OpenCV wrote no baseline SOF0 marker")
    # FFC0, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
