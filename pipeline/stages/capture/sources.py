"""Capture sources: a camera, a video file or an image folder, read one frame at a time.

Live sources (URL, USB) are read by a grabber thread that keeps only the newest frame, so a slow
consumer always gets the freshest picture; replays (files, folders) deliver every frame and end
with ``StopIteration``. ``crop_roi`` cuts the configured region out of each frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.core.config import CameraSettings

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm"})


class SourceError(RuntimeError):
    """The source cannot be opened or read (live sources reconnect, replays stop)."""


class RoiError(ValueError):
    """The configured ROI does not intersect the frame: a configuration error, not a glitch."""


@dataclass
class Frame:
    image: np.ndarray
    ts_ns: int


# ------------------------------------------------------------------------------------------------
# sources


class Source(Protocol):
    live: bool

    def open(self) -> None: ...

    def read(self, timeout_s: float) -> Frame | None:
        """Next frame; ``None`` = nothing within ``timeout_s`` (live); raises ``StopIteration``
        at the end of a replay and ``SourceError`` when the source failed."""
        ...

    def close(self) -> None: ...

    def native_fps(self) -> float: ...


def _as_8bit(image: np.ndarray) -> np.ndarray:
    """Grey or BGR uint8, whatever OpenCV read (16-bit, alpha channel, single-channel 3D)."""
    if image.dtype != np.uint8:
        image = cv2.convertScaleAbs(image, alpha=255.0 / max(float(image.max()), 1.0))
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


class FolderSource:
    """Every image of a folder in sorted file-name order (optionally forever)."""

    live = False

    def __init__(self, path: str | Path, loop: bool = False) -> None:
        self.path = Path(path)
        self.loop = loop
        self.unreadable = 0
        self._files: list[Path] = []
        self._iter: Iterator[Path] = iter(())

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"image folder {str(self.path)!r} does not exist")
        self._files = sorted(
            p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self._files:
            raise SourceError(
                f"image folder {str(self.path)!r} has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self._iter = iter(self._files)

    def read(self, timeout_s: float) -> Frame | None:
        misses = 0
        while True:
            try:
                path = next(self._iter)
            except StopIteration:
                if not self.loop:
                    raise
                if misses >= len(self._files):
                    raise SourceError(f"no readable image in {str(self.path)!r}") from None
                self._iter = iter(self._files)
                continue
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None or image.size == 0:
                self.unreadable += 1
                misses += 1
                log.warning("skipping unreadable image", extra={"path": str(path)})
                continue
            return Frame(_as_8bit(image), time.time_ns())

    def close(self) -> None:
        self._iter = iter(())

    def native_fps(self) -> float:
        return 0.0


class VideoFileSource:
    """Every frame of a video file through OpenCV/FFmpeg (optionally forever)."""

    live = False

    def __init__(self, path: str | Path, loop: bool = False) -> None:
        self.path = Path(path)
        self.loop = loop
        self._cap: cv2.VideoCapture | None = None
        self._frames_this_pass = 0

    def open(self) -> None:
        if not self.path.is_file():
            raise SourceError(f"video file {str(self.path)!r} does not exist")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise SourceError(f"OpenCV cannot open video file {str(self.path)!r}")
        self._cap = cap
        self._frames_this_pass = 0

    def read(self, timeout_s: float) -> Frame | None:
        if self._cap is None:
            raise SourceError("video file not open")
        ok, image = self._cap.read()
        if not ok:
            if self._frames_this_pass == 0:
                raise SourceError(f"video file {str(self.path)!r} has no decodable frame")
            if not self.loop:
                raise StopIteration
            self.close()
            self.open()
            ok, image = self._cap.read()
            if not ok:
                raise SourceError(f"video file {str(self.path)!r} could not be rewound")
        self._frames_this_pass += 1
        return Frame(_as_8bit(image), time.time_ns())

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def native_fps(self) -> float:
        fps = float(self._cap.get(cv2.CAP_PROP_FPS)) if self._cap is not None else 0.0
        return fps if 0 < fps < 1000 else 0.0


class LiveSource:
    """An RTSP/HTTP stream or a USB camera; a grabber thread keeps only the newest frame."""

    live = True

    def __init__(
        self, target: str | int, open_timeout_s: float = 10.0, read_timeout_s: float = 10.0
    ) -> None:
        self.target = target
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._counter = 0
        self._taken = 0
        self._failure: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            int(self.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            int(self.read_timeout_s * 1000),
        ]
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target, cv2.CAP_ANY, params)
        else:
            if self.target.lower().startswith("rtsp"):
                # RTP over TCP: lost UDP packets smear frames, which an inspection model would
                # flag as defects. Users can still choose via OPENCV_FFMPEG_CAPTURE_OPTIONS.
                os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
            cap = cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self._describe()}")
        with contextlib.suppress(cv2.error):
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._stop.clear()
        self._failure = None
        self._latest = None
        self._thread = threading.Thread(
            target=self._grab, args=(cap,), name=f"grab-{self._describe()}", daemon=True
        )
        self._thread.start()

    def _describe(self) -> str:
        return f"USB camera {self.target}" if isinstance(self.target, int) else str(self.target)

    def _grab(self, cap: cv2.VideoCapture) -> None:
        try:
            while not self._stop.is_set():
                ok, image = cap.read()
                if not ok or image is None:
                    with self._cond:
                        self._failure = f"{self._describe()} stopped delivering frames"
                        self._cond.notify_all()
                    return
                frame = Frame(_as_8bit(image), time.time_ns())
                with self._cond:
                    self._latest = frame
                    self._counter += 1
                    self._cond.notify_all()
        except cv2.error as exc:
            with self._cond:
                self._failure = f"{self._describe()}: {exc}"
                self._cond.notify_all()
        finally:
            cap.release()

    def read(self, timeout_s: float) -> Frame | None:
        """The newest frame not returned before; waits up to ``timeout_s`` for one."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._counter == self._taken:
                if self._failure is not None:
                    raise SourceError(self._failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            self._taken = self._counter
            return self._latest

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        self._thread = None
        if thread is not None:
            # the grabber releases the capture itself; a read blocked in FFmpeg ends at its timeout
            thread.join(timeout=1.0)

    def native_fps(self) -> float:
        return 0.0


def open_source(camera: CameraSettings) -> Source:
    kind = camera.source_kind
    # a blocked FFmpeg read should end soon after the watchdog declared the camera offline
    timeouts = {
        "open_timeout_s": max(5.0, camera.offline_after_s),
        "read_timeout_s": camera.offline_after_s + 1.0,
    }
    if kind == "usb":
        return LiveSource(camera.usb_index, **timeouts)
    if kind == "url":
        return LiveSource(camera.source, **timeouts)
    if kind == "folder":
        return FolderSource(camera.source, loop=camera.loop)
    return VideoFileSource(camera.source, loop=camera.loop)


def crop_roi(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """The ``[x, y, w, h]`` part of ``image`` clipped to its bounds; raises if nothing is left."""
    if roi is None:
        return image
    x, y, w, h = roi
    height, width = image.shape[:2]
    x1, y1 = min(x + w, width), min(y + h, height)
    if x >= width or y >= height or x1 <= x or y1 <= y:
        raise RoiError(f"roi {list(roi)} lies outside the {width}x{height} frame")
    return image[y:y1, x:x1]
