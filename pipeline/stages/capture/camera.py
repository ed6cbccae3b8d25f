"""One camera's capture: a supervised source thread and a Redis writer joined by a buffer.

The *source* loop opens and supervises the source (reconnect with exponential backoff, watchdog
for absent and frozen frames, online/offline events), paces it, crops the ROI and encodes; the
*writer* (``pipeline.stages.capture.writer``) moves the encoded frames to Redis, so the camera
never waits on Redis.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis

from pipeline.core.config import CameraSettings
from pipeline.core.health import HEARTBEAT
from pipeline.core.image_codec import encode_image
from pipeline.core.metrics import (
    CAMERA_EVENTS,
    CAMERA_ONLINE,
    FRAMES_CAPTURED,
    FRAMES_DROPPED,
)
from pipeline.core.status import StatusEvent, StatusEventType
from pipeline.core.wire import StreamKeys
from pipeline.stages.capture.sources import (
    FolderSource,
    Frame,
    RoiError,
    Source,
    SourceError,
    crop_roi,
    open_source,
)
from pipeline.stages.capture.writer import CaptureStats, Encoded, FrameBuffer, RedisWriter

log = logging.getLogger(__name__)

_FROZEN_STRIDE = 8  # compare every 8th pixel: a frozen stream repeats exactly, live noise does not


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
        self.buffer = FrameBuffer(camera.buffer_frames)
        self.writer = RedisWriter(
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

    def _pump(self, source: Source) -> int | None:
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

    def _deliver(self, frame: Frame) -> None:
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
        item = Encoded(
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
