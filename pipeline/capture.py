"""Capture: read a camera (or replay a file/folder), encode frames, XADD them to ``frames:{cam}``.

Two threads per camera, joined by a bounded buffer, so the camera never waits on Redis:

- the *source* thread opens and supervises the source (reconnect with exponential backoff,
  watchdog for absent and frozen frames, online/offline events), paces it, crops the ROI and
  encodes. Live sources (URL, USB) are read by a grabber thread that keeps only the newest frame,
  so a slow consumer always gets the freshest picture. Replays (files, folders) deliver every frame.
- the *writer* thread moves encoded frames to Redis in pipelined XADDs with approximate MAXLEN and
  reconnects with backoff when Redis is slow or down. When the buffer is full a live camera drops
  its oldest frame (counted); a replay waits instead, so no file frame is ever lost.

``seq`` numbers every captured frame, dropped ones included (gaps mean drops); it continues after
the highest ``seq`` this camera ever wrote (kept in ``capture:{cam}:seq``) or finds in the stream's
tail, so a restarted capture never reuses numbers, whatever entries the tail holds.

Writes are idempotent: every frame gets an explicit entry id ``<ms>-<seq>`` (capture time in ms,
raised when needed to stay above the stream's last id). When the Redis client retries a write
after a timeout while the server did execute it (a frozen server), the retried XADD is refused as
"equal or smaller than the top item"; the writer then checks that the entry with that id carries
this frame's ``seq`` and counts it as written. No frame is ever in the stream twice.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import redis

from pipeline.config import CameraSettings
from pipeline.observability import (
    CAMERA_EVENTS,
    CAMERA_ONLINE,
    CAPTURE_BUFFER,
    FRAMES_CAPTURED,
    FRAMES_DROPPED,
    FRAMES_WRITTEN,
    HEARTBEAT,
    REDIS_ERRORS,
    StatusEvent,
    StatusEventType,
    emit_status,
)
from pipeline.redis_conn import RedisVersionError, check_server_version
from pipeline.wire import FrameMessage, StreamKeys, encode_image

__all__ = [
    "IMAGE_SUFFIXES",
    "CaptureStats",
    "FolderSource",
    "LiveSource",
    "RoiError",
    "SourceError",
    "VideoFileSource",
    "crop_roi",
    "open_source",
    "run_capture",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm"})
_WRITE_BATCH_FRAMES = 32
_WRITE_BATCH_BYTES = 16 * 1024 * 1024
_RESUME_SCAN = 64  # newest entries inspected for the highest seq at start
_ID_TOO_SMALL = "equal or smaller than the target stream top item"
_FROZEN_STRIDE = 8  # compare every 8th pixel: a frozen stream repeats exactly, live noise does not


class SourceError(RuntimeError):
    """The source cannot be opened or read (live sources reconnect, replays stop)."""


class RoiError(ValueError):
    """The configured ROI does not intersect the frame: a configuration error, not a glitch."""


@dataclass
class CaptureStats:
    """What one camera did; returned by ``run_capture`` and sent in ``capture.stats`` events."""

    camera: str
    frames_read: int = 0
    frames_written: int = 0
    frames_dropped: int = 0  # buffer full (Redis slow or down) or not flushed at shutdown
    frames_unreadable: int = 0  # files in a folder that are not images OpenCV can read
    reconnects: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    finished: bool = False  # the replay source was read to its end
    error: str | None = None
    error_is_permanent: bool = False  # a restart will not help (missing file, bad ROI, old Redis)
    started_at: float = field(default_factory=time.time)
    duration_s: float = 0.0
    events: dict[str, int] = field(default_factory=dict)

    def as_detail(self) -> dict[str, object]:
        return {
            "frames_read": self.frames_read,
            "frames_written": self.frames_written,
            "frames_dropped": self.frames_dropped,
            "frames_unreadable": self.frames_unreadable,
            "reconnects": self.reconnects,
            "last_seq": self.last_seq,
        }


@dataclass
class _Frame:
    image: np.ndarray
    ts_ns: int


# ------------------------------------------------------------------------------------------------
# sources


class _Source(Protocol):
    live: bool

    def open(self) -> None: ...

    def read(self, timeout_s: float) -> _Frame | None:
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

    def read(self, timeout_s: float) -> _Frame | None:
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
            return _Frame(_as_8bit(image), time.time_ns())

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

    def read(self, timeout_s: float) -> _Frame | None:
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
        return _Frame(_as_8bit(image), time.time_ns())

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
        self._latest: _Frame | None = None
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
                frame = _Frame(_as_8bit(image), time.time_ns())
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

    def read(self, timeout_s: float) -> _Frame | None:
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


def open_source(camera: CameraSettings) -> _Source:
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


# ------------------------------------------------------------------------------------------------
# buffer + Redis writer


@dataclass
class _Encoded:
    index: int  # capture counter of this run; seq = seq_base + index
    ts_ns: int
    enc: str
    w: int
    h: int
    c: int
    data: bytes
    entry_id: tuple[int, int] | None = None  # fixed at the first write attempt, kept for retries


class _Buffer:
    """Bounded FIFO between the source and the writer: live sources drop the oldest entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.deque[_Encoded] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put_drop_oldest(self, item: _Encoded) -> _Encoded | None:
        with self._cond:
            dropped = self._items.popleft() if len(self._items) >= self.capacity else None
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def put_wait(self, item: _Encoded, abort: Callable[[], bool]) -> bool:
        with self._cond:
            while len(self._items) >= self.capacity:
                if abort():
                    return False
                self._cond.wait(0.1)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take(self, max_items: int, max_bytes: int, timeout_s: float) -> list[_Encoded]:
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout_s)
            out: list[_Encoded] = []
            size = 0
            while self._items and len(out) < max_items and (not out or size < max_bytes):
                item = self._items.popleft()
                out.append(item)
                size += len(item.data)
            if out:
                self._cond.notify_all()
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def drain(self) -> list[_Encoded]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items


class _Writer(threading.Thread):
    """Moves frames and status events to Redis; never lets a Redis problem reach the source."""

    def __init__(
        self,
        camera: CameraSettings,
        client: redis.Redis,
        keys: StreamKeys,
        buffer: _Buffer,
        stats: CaptureStats,
        stats_lock: threading.Lock,
        *,
        source_name: str,
    ) -> None:
        super().__init__(name=f"capture-writer-{camera.id}", daemon=True)
        self.camera = camera
        self.client = client
        self.keys = keys
        self.buffer = buffer
        self.stats = stats
        self.stats_lock = stats_lock
        self.source_name = source_name
        self.events: collections.deque[StatusEvent] = collections.deque(maxlen=1000)
        self.finish = threading.Event()  # no more frames will come: write what is left, then exit
        self.abort_at: float | None = None  # monotonic deadline for flushing at shutdown
        self.fatal: str | None = None
        self.fatal_is_permanent = False
        self.seq_base: int | None = None
        self._top: tuple[int, int] = (0, 0)  # the stream's last id as far as we know
        self._inflight: list[_Encoded] = []
        self._backoff = 0.0
        self._next_stats = time.monotonic() + camera.status_interval_s
        self._redis_down_since: float | None = None
        self._last_error_log = 0.0
        self._final_stats_sent = False

    # -- public
    def add_event(self, event: StatusEvent) -> None:
        self.events.append(event)
        self.buffer.wake()

    def flush_deadline(self, seconds: float) -> None:
        self.abort_at = time.monotonic() + seconds
        self.finish.set()
        self.buffer.wake()

    # -- thread
    def run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug must not silently stop frames: report and stop the camera
            log.exception("capture writer failed", extra={"camera": self.camera.id})
            self.fatal = f"writer failed: {type(exc).__name__}: {exc}"
        finally:
            HEARTBEAT.done(f"capture-writer:{self.camera.id}")
            leftover = len(self._inflight) + len(self.buffer.drain())
            if leftover:
                self.count_dropped(leftover, "shutdown")
            CAPTURE_BUFFER.labels(self.camera.id).set(0)

    def _loop(self) -> None:
        while True:
            HEARTBEAT.beat(f"capture-writer:{self.camera.id}")
            if self.abort_at is not None and time.monotonic() > self.abort_at:
                return
            if not self._inflight:
                wait = 0.0 if self.finish.is_set() else 0.2
                self._inflight = self.buffer.take(_WRITE_BATCH_FRAMES, _WRITE_BATCH_BYTES, wait)
            CAPTURE_BUFFER.labels(self.camera.id).set(len(self.buffer))
            if self._periodic_stats_due():
                self.events.append(self._stats_event())
            if not self._inflight and not self.events:
                if self.finish.is_set() and len(self.buffer) == 0:
                    if self._final_stats_sent:
                        return
                    self._final_stats_sent = True
                    self.events.append(self._stats_event())
                continue
            if self._backoff and not self._sleep(self._backoff):
                return
            try:
                self._write()
            except (RedisVersionError, redis.exceptions.NoPermissionError) as exc:
                self.fatal = str(exc)
                if isinstance(exc, redis.exceptions.NoPermissionError):
                    self.fatal = f"Redis refused a command (check the ACL user of capture): {exc}"
                self.fatal_is_permanent = True
                log.error(self.fatal, extra={"camera": self.camera.id})
                return
            except redis.RedisError as exc:
                self._on_redis_error(exc)
            else:
                self._on_redis_ok()

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; False when the shutdown flush deadline passed."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.abort_at is not None and time.monotonic() > self.abort_at:
                return False
            time.sleep(min(0.05, left))
        return True

    def _write(self) -> None:
        cam = self.camera.id
        stream = self.keys.frames(cam)
        if self.seq_base is None:
            check_server_version(self.client)
            self.seq_base = self._resume_seq()
            self._top = self._stream_top()
        pipe = self.client.pipeline(transaction=False)
        events = [self.events.popleft() for _ in range(len(self.events))]
        for event in events:
            emit_status(pipe, self.keys, event)
        frames = self._inflight
        for item in frames:
            seq = self.seq_base + item.index
            if item.entry_id is None:
                item.entry_id = self._next_id(item.ts_ns, seq)
            msg = FrameMessage(
                cam=cam,
                seq=seq,
                ts_ns=item.ts_ns,
                enc=item.enc,  # type: ignore[arg-type]
                w=item.w,
                h=item.h,
                c=item.c,
                data=item.data,
            )
            pipe.xadd(
                stream,
                msg.to_fields(),
                id=f"{item.entry_id[0]}-{item.entry_id[1]}",
                maxlen=self.camera.maxlen,
                approximate=True,
            )
        if frames:
            pipe.set(self.keys.capture_seq(cam), self.seq_base + frames[-1].index)
        try:
            replies = pipe.execute(raise_on_error=False)
        except BaseException:
            self.events.extendleft(reversed(events))  # keep them for the next attempt
            raise
        for reply in replies[: len(events)]:
            if isinstance(reply, Exception):
                raise reply  # the events were not written; frames follow the same rule below
        failed = self._settle_replies(frames, replies[len(events) : len(events) + len(frames)])
        if isinstance(replies[-1], Exception) and frames:
            raise replies[-1]
        written = [f for f in frames if f not in failed]
        if written:
            FRAMES_WRITTEN.labels(cam).inc(len(written))
            with self.stats_lock:
                self.stats.frames_written += len(written)
                if self.stats.first_seq is None:
                    self.stats.first_seq = self.seq_base + written[0].index
                self.stats.last_seq = self.seq_base + written[-1].index
        self._inflight = failed  # retried (with fresh ids where theirs cannot be used)
        if failed:
            raise redis.ResponseError(f"{len(failed)} frame(s) not written yet; retrying")

    def _settle_replies(self, frames: list[_Encoded], replies: list[object]) -> list[_Encoded]:
        """Frames whose XADD did not take; a refused id that already holds the frame counts."""
        failed: list[_Encoded] = []
        for item, reply in zip(frames, replies, strict=True):
            if not isinstance(reply, Exception):
                continue
            if isinstance(reply, redis.exceptions.NoPermissionError):
                raise reply  # a configuration error, not something a retry fixes
            if _ID_TOO_SMALL in str(reply) and self._already_written(item):
                continue  # a retried write of an entry the server had already added
            log.warning(
                "frame write refused; retrying under a new id",
                extra={"camera": self.camera.id, "error": str(reply)},
            )
            item.entry_id = None
            self._top = max(self._top, self._stream_top())
            failed.append(item)
        return failed

    def _already_written(self, item: _Encoded) -> bool:
        assert item.entry_id is not None and self.seq_base is not None
        entry = f"{item.entry_id[0]}-{item.entry_id[1]}"
        rows = self.client.xrange(self.keys.frames(self.camera.id), entry, entry, count=1)
        if not rows:
            return False
        fields = rows[0][1]
        return fields.get(b"seq") == str(self.seq_base + item.index).encode()

    def _next_id(self, ts_ns: int, seq: int) -> tuple[int, int]:
        """``<ms>-<seq>`` above the stream's last id: ordered, and a retry is recognisable."""
        ms = max(ts_ns // 1_000_000, self._top[0])
        if (ms, seq) <= self._top:
            ms = self._top[0] + 1
        self._top = (ms, seq)
        return self._top

    def _stream_top(self) -> tuple[int, int]:
        """The stream's last generated id (new ids must exceed it even if that entry is gone)."""
        try:
            info = self.client.xinfo_stream(self.keys.frames(self.camera.id))
        except redis.ResponseError:  # no such key yet
            return (0, 0)
        raw = info.get("last-generated-id") or info.get(b"last-generated-id") or b"0-0"
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ms, _, part = text.partition("-")
        return int(ms), int(part or 0)

    def _resume_seq(self) -> int:
        """One past the highest ``seq`` this camera wrote, so restarts never reuse numbers.

        The counter key is the lower bound (it survives a tail of foreign or seq-less entries);
        the newest stream entries of this camera can be ahead of it when a write was cut off
        between the frames and the counter.
        """
        cam = self.camera.id
        best = -1
        counter = self.client.get(self.keys.capture_seq(cam))
        with contextlib.suppress(TypeError, ValueError):
            best = max(best, int(counter))  # type: ignore[arg-type]
        for _, fields in self.client.xrevrange(self.keys.frames(cam), count=_RESUME_SCAN):
            if fields.get(b"cam") != cam.encode():
                continue
            with contextlib.suppress(TypeError, ValueError):
                seq = int(fields.get(b"seq"))  # type: ignore[arg-type]
                if seq >= 0:
                    best = max(best, seq)
        return best + 1

    def _on_redis_error(self, exc: redis.RedisError) -> None:
        REDIS_ERRORS.labels("capture").inc()
        now = time.monotonic()
        if self._redis_down_since is None:
            self._redis_down_since = now
        self._backoff = min(max(self._backoff * 2, 0.1), 5.0)
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            log.warning(
                "Redis unavailable, buffering frames",
                extra={
                    "camera": self.camera.id,
                    "error": f"{type(exc).__name__}: {exc}",
                    "buffered": len(self.buffer),
                    "retry_in_s": round(self._backoff, 2),
                },
            )

    def _on_redis_ok(self) -> None:
        if self._redis_down_since is not None:
            log.info(
                "Redis reachable again",
                extra={
                    "camera": self.camera.id,
                    "down_s": round(time.monotonic() - self._redis_down_since, 1),
                    "dropped_total": self.stats.frames_dropped,
                },
            )
            self._redis_down_since = None
        self._backoff = 0.0

    def _periodic_stats_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_stats:
            return False
        self._next_stats = now + self.camera.status_interval_s
        return True

    def _stats_event(self) -> StatusEvent:
        with self.stats_lock:
            detail = self.stats.as_detail()
        detail["buffered"] = len(self.buffer)
        detail["redis_down"] = self._redis_down_since is not None
        return StatusEvent(
            event="capture.stats", source=self.source_name, cam=self.camera.id, detail=detail
        )

    def count_dropped(self, n: int, reason: str) -> None:
        FRAMES_DROPPED.labels(self.camera.id, reason).inc(n)
        with self.stats_lock:
            self.stats.frames_dropped += n


# ------------------------------------------------------------------------------------------------
# the supervised source loop


class _CameraCapture:
    def __init__(
        self,
        camera: CameraSettings,
        client: redis.Redis,
        keys: StreamKeys,
        stop: threading.Event,
        *,
        source_name: str,
        flush_timeout_s: float,
    ) -> None:
        self.camera = camera
        self.stop = stop
        self.flush_timeout_s = flush_timeout_s
        self.stats = CaptureStats(camera=camera.id)
        self.lock = threading.Lock()
        self.buffer = _Buffer(camera.buffer_frames)
        self.writer = _Writer(
            camera, client, keys, self.buffer, self.stats, self.lock, source_name=source_name
        )
        self.source_name = source_name
        self.realtime = camera.is_realtime
        self.index = 0
        self.online: bool | None = None  # unknown until the first frame or failure
        self._frozen_ref: np.ndarray | None = None
        self._frozen_since: float | None = None
        self._frozen_reported = False
        self._roi_checked = False

    # -- events
    def _event(self, kind: StatusEventType, reason: str = "", **detail: object) -> None:
        name = kind.split(".", 1)[1]
        CAMERA_EVENTS.labels(self.camera.id, name).inc()
        with self.lock:
            self.stats.events[name] = self.stats.events.get(name, 0) + 1
        if kind == "camera.online":
            CAMERA_ONLINE.labels(self.camera.id).set(1)
        elif kind in ("camera.offline", "camera.finished", "camera.error"):
            CAMERA_ONLINE.labels(self.camera.id).set(0)
        level = logging.INFO if kind in ("camera.online", "camera.finished") else logging.WARNING
        log.log(level, kind, extra={"camera": self.camera.id, "reason": reason, **detail})
        self.writer.add_event(
            StatusEvent(
                event=kind,
                source=self.source_name,
                cam=self.camera.id,
                reason=reason,
                detail=detail,
            )
        )

    def _set_online(self, online: bool, reason: str = "") -> None:
        if online and self.online is not True:
            self._event("camera.online", reason)
        elif not online and self.online is not False:
            self._event("camera.offline", reason)
        self.online = online

    # -- main
    def run(self) -> CaptureStats:
        self.writer.start()
        try:
            self._supervise()
        except RoiError as exc:
            self.stats.error = str(exc)
            self.stats.error_is_permanent = True
            self._event("camera.error", self.stats.error)
        except Exception as exc:
            log.exception("capture failed", extra={"camera": self.camera.id})
            self.stats.error = f"{type(exc).__name__}: {exc}"
            self._event("camera.error", self.stats.error)
        finally:
            HEARTBEAT.done(f"capture:{self.camera.id}")  # a long final flush is not a hang
            if self.stop.is_set() or self.stats.error is not None:
                self.writer.flush_deadline(self.flush_timeout_s)
            else:
                self.writer.finish.set()  # replay done: write everything, however long it takes
            self.buffer.wake()
            self._join_writer()
            if self.stats.error is None and self.writer.fatal is not None:
                self.stats.error = self.writer.fatal
                self.stats.error_is_permanent = self.writer.fatal_is_permanent
            self.stats.duration_s = time.time() - self.stats.started_at
        return self.stats

    def _beat(self) -> None:
        # reconnect backoff and the offline watchdog are legitimate pauses of this loop
        limit = self.camera.reconnect_max_s + self.camera.offline_after_s
        HEARTBEAT.beat(f"capture:{self.camera.id}", limit_s=limit)

    def _aborting(self) -> bool:
        return self.stop.is_set() or not self.writer.is_alive()

    def _join_writer(self) -> None:
        while self.writer.is_alive():
            self.writer.join(0.2)
            if self.stop.is_set() and self.writer.abort_at is None:
                self.writer.flush_deadline(self.flush_timeout_s)

    def _supervise(self) -> None:
        delay = self.camera.reconnect_initial_s
        first = True
        while not self.stop.is_set() and self.writer.fatal is None:
            self._beat()
            source = open_source(self.camera)
            try:
                if not first:
                    self.stats.reconnects += 1
                    CAMERA_EVENTS.labels(self.camera.id, "reconnect").inc()
                source.open()
                first = False
                delivered = self._pump(source)
                if delivered is None:  # replay finished
                    self.stats.finished = True
                    self._event("camera.finished", "end of source", frames_read=self.index)
                    return
                if delivered:
                    delay = self.camera.reconnect_initial_s
            except SourceError as exc:
                first = False
                if not source.live:
                    self.stats.error = str(exc)
                    self.stats.error_is_permanent = True
                    self._event("camera.error", str(exc))
                    return
                if self.online is False:
                    log.warning(
                        "camera still unavailable",
                        extra={"camera": self.camera.id, "reason": str(exc), "retry_in_s": delay},
                    )
                self._set_online(False, str(exc))
            finally:
                source.close()
                if isinstance(source, FolderSource) and source.unreadable:
                    self._count_unreadable(source)
            if self.stop.wait(delay):
                return
            delay = min(delay * 2, self.camera.reconnect_max_s)

    def _count_unreadable(self, source: FolderSource) -> None:
        FRAMES_DROPPED.labels(self.camera.id, "unreadable").inc(source.unreadable)
        self.stats.frames_unreadable += source.unreadable
        source.unreadable = 0

    def _pump(self, source: _Source) -> int | None:
        """Read until stop/failure; returns frames delivered, or None when a replay ended."""
        fps = self.camera.fps or (source.native_fps() if self.realtime and not source.live else 0)
        period = 1.0 / fps if fps > 0 else 0.0
        next_due = time.monotonic()
        last_frame_at = time.monotonic()
        delivered = 0
        poll = min(0.25, self.camera.offline_after_s / 4)
        while not self.stop.is_set():
            self._beat()
            if self.writer.fatal is not None:
                return delivered
            if period:
                wait = next_due - time.monotonic()
                if wait > 0 and self.stop.wait(wait):
                    break
            try:
                frame = source.read(poll)
            except StopIteration:
                return None
            now = time.monotonic()
            if frame is None:
                silent = now - last_frame_at
                if silent >= self.camera.offline_after_s:
                    raise SourceError(f"no frame for {silent:.1f} s")
                continue
            last_frame_at = now
            if period:
                next_due = max(next_due + period, now - period)  # no burst after a stall
            self._set_online(True)
            self._watch_frozen(frame.image, now)
            self._deliver(frame)
            delivered += 1
        return delivered

    def _watch_frozen(self, image: np.ndarray, now: float) -> None:
        limit = self.camera.frozen_after_s
        if limit is None:
            return
        probe = image[::_FROZEN_STRIDE, ::_FROZEN_STRIDE]
        same = self._frozen_ref is not None and np.array_equal(probe, self._frozen_ref)
        if not same:
            self._frozen_ref = probe.copy()
            self._frozen_since = now
            if self._frozen_reported:
                self._frozen_reported = False
                self._event("camera.unfrozen", "frames change again")
            return
        if self._frozen_since is None:
            self._frozen_since = now
        if not self._frozen_reported and now - self._frozen_since >= limit:
            self._frozen_reported = True
            self._event("camera.frozen", f"identical frames for {now - self._frozen_since:.1f} s")

    def _deliver(self, frame: _Frame) -> None:
        image = crop_roi(frame.image, self.camera.roi)
        if not self._roi_checked and self.camera.roi is not None:
            self._roi_checked = True
            x, y, w, h = self.camera.roi
            if image.shape[1] != w or image.shape[0] != h:
                log.warning(
                    "roi clipped to the frame",
                    extra={"camera": self.camera.id, "roi": [x, y, w, h], "got": image.shape[:2]},
                )
        data = encode_image(image, self.camera.encoding, self.camera.quality)
        item = _Encoded(
            index=self.index,
            ts_ns=frame.ts_ns,
            enc=self.camera.encoding,
            w=int(image.shape[1]),
            h=int(image.shape[0]),
            c=1 if image.ndim == 2 else 3,
            data=data,
        )
        self.index += 1
        FRAMES_CAPTURED.labels(self.camera.id).inc()
        with self.lock:
            self.stats.frames_read += 1
        if self.realtime:
            if self.buffer.put_drop_oldest(item) is not None:
                self.writer.count_dropped(1, "buffer_full")
        elif not self.buffer.put_wait(item, self._aborting):
            self.writer.count_dropped(1, "shutdown")


def run_capture(
    camera: CameraSettings,
    redis_client: redis.Redis,
    keys: StreamKeys,
    stop_event: threading.Event,
    *,
    source_name: str = "capture",
    flush_timeout_s: float = 5.0,
) -> CaptureStats:
    """Capture ``camera`` until its replay ends (all frames written) or ``stop_event`` is set.

    After ``stop_event`` buffered frames get ``flush_timeout_s`` to reach Redis; the rest are
    counted as dropped. Errors (missing file, Redis too old) end up in ``CaptureStats.error``.
    """
    return _CameraCapture(
        camera,
        redis_client,
        keys,
        stop_event,
        source_name=source_name,
        flush_timeout_s=flush_timeout_s,
    ).run()
