"""The results publisher: results:{cam} -> ordered, de-duplicated -> alarm episodes -> alarms.

The only stateful stage, so it is built around three guarantees:

- One owner per camera. A lease key (``publisher:{cam}:lease``, redis-py ``Lock``: SET NX PX
  with a random token, renewed by compare-and-pexpire) says who serves a camera; a publisher serves
  every configured camera whose lease it holds and takes over a camera whose owner stopped renewing.
- Capture order. Workers finish frames out of order; results are buffered and released in stream
  order. A missing frame is waited for only while it can still arrive: while a worker still holds
  an older frame pending, and at most ``reorder_wait_ms`` / ``window`` frames, so a lost frame
  cannot stall alarms.
- Exactly one event stream. The alarm events, the state machine snapshot with the high-water mark
  (``publisher:{cam}:state``) and the XACK of the consumed results are written in one MULTI/EXEC,
  fenced by WATCH on the lease: a restarted or replacing publisher continues an open alarm from the
  stored state, re-reads only results that were never committed, and skips every frame id at or
  below the high-water mark, so it neither raises a second ``alarm.started`` nor repeats an event.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import redis
from redis.exceptions import LockError, WatchError
from redis.lock import Lock

from pipeline import observability as obs
from pipeline.alarms import AlarmStateMachine, AlarmTransition, IgnoreMask
from pipeline.lifecycle import GracefulStop
from pipeline.redis_conn import ensure_group, is_cluster
from pipeline.stage_settings import PublisherSettings
from pipeline.wire import (
    AlarmEvent,
    FrameMessage,
    Region,
    ResultMessage,
    StreamKeys,
    WireError,
    deadletter_fields,
    decode_image,
)

log = logging.getLogger(__name__)

STREAM_ID_ZERO = (0, 0)


def parse_stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(value: tuple[int, int]) -> str:
    return f"{value[0]}-{value[1]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class _Buffered:
    entry_id: str  # id in results:{cam}
    result: ResultMessage
    frame_key: tuple[int, int]
    arrived: float  # monotonic


@dataclass
class CameraState:
    """Everything a publisher holds for one camera while it owns the lease."""

    cam: str
    lease: Lock
    token: bytes
    machine: AlarmStateMachine
    hwm: tuple[int, int] = STREAM_ID_ZERO  # newest frame id fed to the machine
    hwm_seq: int = -1
    buffer: dict[tuple[int, int], _Buffered] = field(default_factory=dict)
    to_ack: list[str] = field(default_factory=list)  # result entries consumed, not yet committed
    events: list[AlarmEvent] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    oldest_in_flight: tuple[int, int] | None = None  # oldest frame a worker still holds
    drained: bool = False  # the last read returned everything the results stream had
    overlay_cache: tuple[str, bytes | None, str] | None = None
    renewed: float = 0.0


@dataclass
class PublisherStats:
    events: dict[str, int] = field(default_factory=lambda: {t: 0 for t in _EVENT_TYPES})
    results: int = 0
    duplicates: int = 0
    skipped_gaps: int = 0
    acquired: int = 0
    lost: int = 0


_EVENT_TYPES = ("alarm.started", "alarm.updated", "alarm.ended")


class AlarmPublisher(GracefulStop):
    """Serves the alarm logic for every configured camera whose lease it can hold."""

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        settings: PublisherSettings,
        cameras: Sequence[str],
        *,
        worker_group: str = "workers",
        name: str | None = None,
        ignore_masks: Mapping[str, IgnoreMask] | None = None,
    ) -> None:
        if not cameras:
            raise ValueError("the publisher needs at least one camera")
        self.client = client
        self.keys = keys
        self.settings = settings
        self.cameras = sorted(set(cameras))
        self.worker_group = worker_group
        self.name = name or settings.consumer_name()
        self.ignore_masks = dict(ignore_masks or {})
        for cam in self.cameras:
            path = settings.alarm_for(cam).ignore_mask
            if cam not in self.ignore_masks and path is not None:
                self.ignore_masks[cam] = IgnoreMask.load(path)  # fail at start, not mid-alarm
        self.owned: dict[str, CameraState] = {}
        self.stats = PublisherStats()
        self._init_stop()
        self._is_cluster = is_cluster(client)
        self._next_lease_check = 0.0

    # ------------------------------------------------------------------------------- control

    def run(self, idle_exit_s: float | None = None) -> PublisherStats:
        """Serve until stopped; on stop, commit what was consumed and hand the leases back."""
        self.ensure_groups()
        self._emit_status("process.started")
        log.info("publisher started", extra={"publisher": self.name, "cameras": self.cameras})
        last_work = time.monotonic()
        try:
            while not self.stopping:
                try:
                    if self.step():
                        last_work = time.monotonic()
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("results consumer group vanished; re-taking the cameras")
                    self._forget_all()
                    self._next_lease_check = 0.0
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    obs.REDIS_ERRORS.labels("publisher").inc()
                    log.warning("redis unavailable, retrying: %s", exc)
                    self._forget_all()  # state is in Redis; reload it when the leases come back
                    self._stop.wait(1.0)
                if idle_exit_s is not None and time.monotonic() - last_work > idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def close(self) -> None:
        """Release leases so another publisher takes over at once instead of after the TTL."""
        for cam in list(self.owned):
            state = self.owned.pop(cam)
            try:
                self._commit(state)
                state.lease.release()
            except (redis.RedisError, LockError) as exc:
                log.warning("could not hand back camera %s cleanly: %s", cam, exc)
            obs.ALARM_ACTIVE.labels(cam).set(0)
        self._emit_status("process.stopped")

    # --------------------------------------------------------------------------- one step

    def step(self) -> int:
        """Renew/acquire leases, read results, advance alarms, commit. Returns results handled."""
        now = time.monotonic()
        if now >= self._next_lease_check:
            self._maintain_leases()
            self._next_lease_check = now + self.settings.lease_ttl_s / 3.0
        if not self.owned:
            self._stop.wait(min(self.settings.block_ms / 1000.0, self.settings.lease_ttl_s / 3.0))
            return 0
        for state in self.owned.values():
            state.oldest_in_flight = self._oldest_in_flight(state.cam)
        handled = self._read_results(self._block_ms())
        for cam in list(self.owned):
            state = self.owned[cam]
            self._release_in_order(state)
            if state.to_ack or state.events or state.dead_letters:
                self._commit(state)
        return handled

    def _block_ms(self) -> int | None:
        """Block on the read only until the next buffered result's wait expires."""
        wait_s = self.settings.block_ms / 1000.0
        deadline = self.settings.reorder_wait_ms / 1000.0
        now = time.monotonic()
        for state in self.owned.values():
            if state.buffer:
                oldest = min(b.arrived for b in state.buffer.values())
                wait_s = min(wait_s, max(0.0, oldest + deadline - now))
        wait_s = min(wait_s, max(0.0, self._next_lease_check - now))
        return int(wait_s * 1000) if wait_s >= 0.001 else None

    # ---------------------------------------------------------------------------- leases

    def ensure_groups(self) -> None:
        for cam in self.cameras:
            self._ensure_group(cam)

    def _ensure_group(self, cam: str) -> None:
        ensure_group(self.client, self.keys.results(cam), self.settings.group)

    def _maintain_leases(self) -> None:
        for cam in list(self.owned):
            state = self.owned[cam]
            try:
                state.lease.reacquire()
                state.renewed = time.monotonic()
            except LockError:
                log.warning("lost the lease of camera %s to another publisher", cam)
                self._forget(cam)
                continue
            self._adopt_orphans(state)
        for cam in self.cameras:
            if cam not in self.owned:
                self._try_acquire(cam)

    def _try_acquire(self, cam: str) -> None:
        lease = self.client.lock(
            self.keys.publisher_lease(cam),
            timeout=self.settings.lease_ttl_s,
            blocking=False,
            thread_local=False,
        )
        token = f"{self.name}:{uuid.uuid4().hex}".encode()
        if not lease.acquire(blocking=False, token=token):
            return
        try:
            self._ensure_group(cam)
            state = self._load_state(cam, lease, token)
            self.owned[cam] = state
            self._take_over_pending(state)
        except Exception:
            self.owned.pop(cam, None)
            lease.release()
            raise
        self.stats.acquired += 1
        obs.ALARM_ACTIVE.labels(cam).set(1 if state.machine.active else 0)
        log.info(
            "serving camera",
            extra={
                "camera": cam,
                "publisher": self.name,
                "open_alarm": state.machine.alarm_id,
                "hwm": format_stream_id(state.hwm),
            },
        )

    def _load_state(self, cam: str, lease: Lock, token: bytes) -> CameraState:
        stored = self.client.hgetall(self.keys.publisher_state(cam))
        alarm_settings = self.settings.alarm_for(cam)
        mask = self.ignore_masks.get(cam)
        if stored.get(b"machine"):
            machine = AlarmStateMachine.from_dict(
                json.loads(stored[b"machine"]), alarm_settings, mask
            )
        else:
            machine = AlarmStateMachine(cam, alarm_settings, mask)
        state = CameraState(cam=cam, lease=lease, token=token, machine=machine)
        if stored.get(b"hwm_id"):
            state.hwm = parse_stream_id(stored[b"hwm_id"])
            state.hwm_seq = int(stored.get(b"hwm_seq", b"-1"))
        state.renewed = time.monotonic()
        return state

    def _take_over_pending(self, state: CameraState) -> None:
        """Results a previous owner read but never committed: claim them, then re-read ours."""
        key = self.keys.results(state.cam)
        for _ in range(100):  # bounded: a Redis 6.2 PEL can keep ids whose entries are gone
            if not self._adopt_orphans(state):
                break
        cursor = "0"
        while True:
            reply = self.client.xreadgroup(
                self.settings.group, self.name, {key: cursor}, count=self.settings.read_count
            )
            items = reply[0][1] if reply else []
            if not items:
                break
            for entry_id, fields in items:
                cursor = _text(entry_id)
                self._accept(state, cursor, fields)

    def _adopt_orphans(self, state: CameraState, batch: int = 1000) -> int:
        """Claim results other publishers read but will never commit (they lost this camera).

        Only the lease holder may commit, so whatever another consumer holds is orphaned: a
        fenced-off or dead former owner. Our own pending entries are left alone (they are in
        our buffer).
        """
        key = self.keys.results(state.cam)
        rows = self.client.xpending_range(key, self.settings.group, "-", "+", batch)
        orphans = [r["message_id"] for r in rows if _text(r["consumer"]) != self.name]
        if not orphans:
            return 0
        claimed = self.client.xclaim(key, self.settings.group, self.name, 0, orphans)
        for entry_id, fields in claimed:
            if entry_id is not None:
                self._accept(state, _text(entry_id), fields or {})
        log.info(
            "adopted results of a former owner", extra={"camera": state.cam, "count": len(orphans)}
        )
        return len(orphans)

    def _forget(self, cam: str) -> None:
        """Drop local state of a camera we no longer own; its new owner redoes uncommitted work."""
        self.owned.pop(cam, None)
        self.stats.lost += 1

    def _forget_all(self) -> None:
        for cam in list(self.owned):
            self._forget(cam)

    # ---------------------------------------------------------------------------- reading

    def _oldest_in_flight(self, cam: str) -> tuple[int, int] | None:
        """Oldest frame entry a worker still holds (delivered, not acked) — it may yet arrive."""
        try:
            rows = self.client.xpending_range(
                self.keys.frames(cam), self.worker_group, min="-", max="+", count=1
            )
        except redis.ResponseError:  # no worker group yet
            return None
        return parse_stream_id(rows[0]["message_id"]) if rows else None

    def _read_results(self, block_ms: int | None) -> int:
        streams = {self.keys.results(cam): ">" for cam in self.owned}
        if self._is_cluster:
            reply = []
            for key in streams:
                got = self.client.xreadgroup(
                    self.settings.group, self.name, {key: ">"}, count=self.settings.read_count
                )
                reply.extend(got or [])
            if not reply and block_ms:
                self._stop.wait(min(block_ms, 20) / 1000.0)
        else:
            reply = (
                self.client.xreadgroup(
                    self.settings.group,
                    self.name,
                    streams,
                    count=self.settings.read_count,
                    block=block_ms,
                )
                or []
            )
        handled = 0
        for state in self.owned.values():
            state.drained = True
        for key, items in reply:
            key = _text(key)
            cam = key[key.index("{") + 1 : key.rindex("}")]
            state = self.owned.get(cam)
            if state is None:
                continue  # lost the lease meanwhile: the new owner claims these
            state.drained = len(items) < self.settings.read_count
            for entry_id, fields in items:
                self._accept(state, _text(entry_id), fields)
                handled += 1
        return handled

    def _accept(self, state: CameraState, entry_id: str, fields: dict[bytes, bytes]) -> None:
        """Buffer one result entry, or mark it for ack when it is a duplicate or unreadable."""
        try:
            result = ResultMessage.from_fields(fields)
            if result.cam != state.cam:
                raise WireError("cam", result.cam, f"result in the stream of camera {state.cam!r}")
            frame_key = parse_stream_id(result.frame_id)
        except (WireError, ValueError) as exc:
            state.to_ack.append(entry_id)
            state.dead_letters.append(
                deadletter_fields(
                    fields,
                    reason="malformed",
                    detail=str(exc),
                    source_key=self.keys.results(state.cam),
                    source_id=entry_id,
                    consumer=self.name,
                )
            )
            return
        held = state.buffer.get(frame_key)
        if held is not None and held.entry_id == entry_id:
            return  # the same entry again (adopted, then re-read from our own pending list)
        if frame_key <= state.hwm or held is not None:
            state.to_ack.append(entry_id)  # redelivered, duplicate, or too late to matter
            self.stats.duplicates += 1
            obs.DUPLICATES.labels(state.cam).inc()
            return
        state.buffer[frame_key] = _Buffered(entry_id, result, frame_key, time.monotonic())

    def _release_in_order(self, state: CameraState) -> None:
        """Feed buffered results to the alarm machine in capture order; wait only while useful."""
        wait_s = self.settings.reorder_wait_ms / 1000.0
        now = time.monotonic()
        for frame_key in sorted(state.buffer):
            item = state.buffer[frame_key]
            contiguous = state.hwm_seq >= 0 and item.result.seq == state.hwm_seq + 1
            # every older frame was acked (its result is in the stream, and a drained read
            # has seen it) or never will be: waiting longer cannot bring anything
            nothing_older_in_flight = state.drained and (
                state.oldest_in_flight is None or state.oldest_in_flight > frame_key
            )
            overfull = len(state.buffer) > self.settings.window
            expired = now - item.arrived >= wait_s
            if not (contiguous or nothing_older_in_flight or overfull or expired):
                break
            if not contiguous and state.hwm_seq >= 0 and item.result.seq > state.hwm_seq + 1:
                self.stats.skipped_gaps += item.result.seq - state.hwm_seq - 1
            del state.buffer[frame_key]
            self._feed(state, item)

    def _feed(self, state: CameraState, item: _Buffered) -> None:
        state.hwm = item.frame_key
        state.hwm_seq = item.result.seq
        state.to_ack.append(item.entry_id)
        self.stats.results += 1
        for transition in state.machine.observe(item.result):
            state.events.append(self._finish_event(state, transition))

    # ---------------------------------------------------------------------------- events

    def _finish_event(self, state: CameraState, transition: AlarmTransition) -> AlarmEvent:
        overlay, status = self._overlay(state, transition)
        return transition.event.model_copy(
            update={
                "emitted_ns": time.time_ns(),
                "publisher": self.name,
                "overlay": overlay,
                "overlay_status": status,
            }
        )

    def _overlay(self, state: CameraState, transition: AlarmTransition) -> tuple[bytes | None, str]:
        if not self.settings.overlays:
            return None, "disabled"
        peak = transition.peak
        cached = state.overlay_cache
        if cached is not None and cached[0] == peak.frame_id:
            return cached[1], cached[2]
        overlay, status = self._render_overlay(state.cam, peak, transition.event.regions)
        state.overlay_cache = (peak.frame_id, overlay, status)
        return overlay, status

    def _render_overlay(
        self, cam: str, peak: ResultMessage, regions: Sequence[Region]
    ) -> tuple[bytes | None, str]:
        if not peak.heatmap:
            return None, "no_heatmap"
        rows = self.client.xrange(self.keys.frames(cam), peak.frame_id, peak.frame_id, count=1)
        if not rows:
            return None, "frame_trimmed"
        try:
            frame = decode_image(FrameMessage.from_fields(rows[0][1]))
        except WireError:
            return None, "frame_undecodable"
        levels = cv2.imdecode(np.frombuffer(peak.heatmap, np.uint8), cv2.IMREAD_GRAYSCALE)
        if levels is None:
            return None, "no_heatmap"
        jpeg = render_overlay(
            frame, levels, regions, (peak.map_h, peak.map_w), self.settings.overlay_quality
        )
        return jpeg, "ok"

    # ---------------------------------------------------------------------------- commit

    def _commit(self, state: CameraState) -> None:
        """Events + state + acks in one MULTI/EXEC, only while we still hold the lease."""
        if not (state.to_ack or state.events or state.dead_letters):
            return
        lease_key = self.keys.publisher_lease(state.cam)
        cam = state.cam
        snapshot = {
            "machine": json.dumps(state.machine.to_dict(), separators=(",", ":")),
            "hwm_id": format_stream_id(state.hwm),
            "hwm_seq": state.hwm_seq,
            "owner": self.name,
            "updated_ns": time.time_ns(),
        }
        events = list(state.events)
        mirror_later = self._is_cluster  # the global stream lives in another slot on Cluster
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(lease_key)
                if pipe.get(lease_key) != state.token:
                    raise WatchError("lease changed hands")
                pipe.multi()
                for event in events:
                    fields = event.to_fields()
                    pipe.xadd(
                        self.keys.camera_alarms(cam),
                        fields,
                        maxlen=self.settings.alarms_maxlen,
                        approximate=True,
                    )
                    if not mirror_later:
                        pipe.xadd(
                            self.keys.alarms(),
                            fields,
                            maxlen=self.settings.alarms_maxlen,
                            approximate=True,
                        )
                for dead in state.dead_letters:
                    pipe.xadd(self.keys.deadletter(cam), dead, maxlen=10_000, approximate=True)
                pipe.hset(self.keys.publisher_state(cam), mapping=snapshot)
                if state.to_ack:
                    pipe.xack(self.keys.results(cam), self.settings.group, *state.to_ack)
                pipe.execute()
        except WatchError:
            log.warning("lease of camera %s changed hands before commit; dropping local work", cam)
            self._forget(cam)
            return
        if mirror_later:
            for event in events:
                self.client.xadd(
                    self.keys.alarms(),
                    event.to_fields(),
                    maxlen=self.settings.alarms_maxlen,
                    approximate=True,
                )
        state.to_ack.clear()
        state.events.clear()
        state.dead_letters.clear()
        for event in events:
            self._count_event(event)

    def _count_event(self, event: AlarmEvent) -> None:
        self.stats.events[event.type] += 1
        obs.ALARMS.labels(event.cam, event.type.removeprefix("alarm.")).inc()
        obs.ALARM_ACTIVE.labels(event.cam).set(0 if event.type == "alarm.ended" else 1)
        obs.END_TO_END_LATENCY.labels(event.cam, "publisher").observe(
            max(0.0, (event.emitted_ns - event.ts_ns) / 1e9)
        )
        log.info(
            event.type,
            extra={
                "camera": event.cam,
                "alarm_id": event.alarm_id,
                "score": round(event.score, 4),
                "peak_score": round(event.peak_score, 4),
                "frames": event.frame_count,
            },
        )

    def _emit_status(self, event: str) -> None:
        try:
            obs.emit_status(
                self.client,
                self.keys,
                obs.StatusEvent(
                    event=event,
                    source="publisher",
                    reason=self.name,
                    detail={"publisher": self.name, "cameras": sorted(self.owned)},
                ),
            )
        except redis.RedisError as exc:
            log.warning("could not write %s status event: %s", event, exc)


def render_overlay(
    frame_bgr: np.ndarray,
    levels: np.ndarray,
    regions: Sequence[Region],
    map_size: tuple[int, int],
    quality: int = 85,
) -> bytes:
    """JPEG of the frame with the anomaly heatmap blended in where it matters and boxes drawn."""
    h, w = frame_bgr.shape[:2]
    levels = cv2.resize(levels, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    # transparent well below the threshold (level 128), strongest above it
    alpha = np.clip((levels.astype(np.float32) - 64.0) / 128.0, 0.0, 0.75)[..., None]
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
