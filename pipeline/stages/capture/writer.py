"""The capture writer: encoded frames from a bounded buffer to ``frames:{cam}`` in Redis.

The writer thread moves frames to Redis in pipelined XADDs with approximate MAXLEN and reconnects
with backoff when Redis is slow or down, so the camera never waits on Redis. When the buffer is
full a live camera drops its oldest frame (counted); a replay waits instead, so no file frame is
ever lost.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from pipeline.core.config import CameraSettings
from pipeline.core.health import HEARTBEAT
from pipeline.core.metrics import (
    CAPTURE_BUFFER,
    FRAMES_DROPPED,
    FRAMES_WRITTEN,
    REDIS_ERRORS,
)
from pipeline.core.redis_conn import RedisVersionError, check_server_version
from pipeline.core.status import StatusEvent, emit_status
from pipeline.core.wire import FrameMessage, StreamKeys

log = logging.getLogger(__name__)

_WRITE_BATCH_FRAMES = 32
_WRITE_BATCH_BYTES = 16 * 1024 * 1024
RESUME_SCAN = 64  # newest entries inspected for the highest seq at start
_ID_TOO_SMALL = "equal or smaller than the target stream top item"


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
class Encoded:
    index: int  # capture counter of this run; seq = seq_base + index
    ts_ns: int
    enc: str
    w: int
    h: int
    c: int
    data: bytes
    entry_id: tuple[int, int] | None = None  # fixed at the first write attempt, kept for retries


class FrameBuffer:
    """Bounded FIFO between the source and the writer: live sources drop the oldest entry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.deque[Encoded] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put_drop_oldest(self, item: Encoded) -> Encoded | None:
        with self._cond:
            dropped = self._items.popleft() if len(self._items) >= self.capacity else None
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def put_wait(self, item: Encoded, abort: Callable[[], bool]) -> bool:
        with self._cond:
            while len(self._items) >= self.capacity:
                if abort():
                    return False
                self._cond.wait(0.1)
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take(self, max_items: int, max_bytes: int, timeout_s: float) -> list[Encoded]:
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout_s)
            out: list[Encoded] = []
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

    def drain(self) -> list[Encoded]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items


class RedisWriter(threading.Thread):
    """Moves frames and status events to Redis; never lets a Redis problem reach the source."""

    def __init__(
        self,
        camera: CameraSettings,
        client: redis.Redis,
        keys: StreamKeys,
        buffer: FrameBuffer,
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
        self._inflight: list[Encoded] = []
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

    def _settle_replies(self, frames: list[Encoded], replies: list[object]) -> list[Encoded]:
        """Frames whose XADD did not take; a refused id that already holds the frame counts."""
        failed: list[Encoded] = []
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

    def _already_written(self, item: Encoded) -> bool:
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
        for _, fields in self.client.xrevrange(self.keys.frames(cam), count=RESUME_SCAN):
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
