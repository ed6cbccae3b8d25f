"""The results publisher: results:{cam} -> capture order, de-duplicated -> alarm episodes -> alarms.

The only stateful stage. Its promise: **the alarm events equal an in-order replay of all results**
through ``AlarmStateMachine``, whatever fails around it. Built from these rules:

- One owner per camera. A lease key (``publisher:{cam}:lease``, redis-py ``Lock``: SET NX PX
  with a random token, renewed by compare-and-pexpire) says who serves a camera; a publisher serves
  every configured camera whose lease it holds and takes over a camera whose owner stopped renewing.
- Capture order. Workers finish frames out of order; results are held and applied in frame-entry
  order. A result is applied once no older frame can still bring one: every frame between the last
  applied one and it is acked in the workers' group (its result or dead letter exists, and a
  drained read of ``results:{cam}`` has seen it) or gone from the stream. A frame a worker still
  holds (pending) is waited for, but no result is held longer than ``max_gap_wait_ms``: then the
  gap is given up (counted, reported on the status stream) and a result that still arrives for it
  is *late*: acked, counted and reported, not applied. Frames that were never delivered cannot
  exist below a delivered one (the group reads in id order), and dead-lettered or trimmed frames
  are not pending, so they close their gap at once.
- De-duplication by frame entry id and by (camera, ``seq``): a seq already applied is a duplicate
  (a frame captured twice), acked and counted.
- Nothing half-done is ever stored. A result is applied on a checkpoint of the state machine; if
  anything raises, the machine is restored and the result retried on the next step, and after
  ``max_apply_attempts`` dead-lettered (``apply_failed``) so the camera goes on. The alarm events,
  the state snapshot (machine, high-water mark, applied seqs) and the XACK of the applied results
  are written in one MULTI/EXEC, fenced by WATCH on the lease; a crash commits nothing and the next
  owner re-reads what was not committed. A stored state that cannot be read is moved aside
  (``publisher.state_reset`` status event) instead of crash-looping the publisher.
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
from pipeline.redis_conn import ensure_group, is_cluster, is_permission_error
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
    decode_result_png,
)

log = logging.getLogger(__name__)

STREAM_ID_ZERO = (0, 0)
OUTSTANDING_PEEK = 64  # pending frames above the high-water mark fetched per check
_REDIS_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


def parse_stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_stream_id(value: tuple[int, int]) -> str:
    return f"{value[0]}-{value[1]}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SeqRanges:
    """Applied ``seq`` numbers as sorted disjoint ``[lo, hi]`` ranges (tiny when seqs run on)."""

    def __init__(self, ranges: Sequence[Sequence[int]] = ()) -> None:
        self.ranges: list[list[int]] = sorted([int(lo), int(hi)] for lo, hi in ranges)

    def __contains__(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in reversed(self.ranges))

    def add(self, seq: int) -> None:
        ranges = self.ranges
        if ranges and ranges[-1][1] + 1 == seq:  # the common case: the next seq
            ranges[-1][1] = seq
            return
        if seq in self:
            return
        ranges.append([seq, seq])
        ranges.sort()
        merged: list[list[int]] = [ranges[0]]
        for lo, hi in ranges[1:]:
            if lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = merged

    def forget_below(self, seq: int) -> None:
        """Bound the memory: drop what lies entirely below ``seq``."""
        self.ranges = [[max(lo, seq), hi] for lo, hi in self.ranges if hi >= seq]


@dataclass
class _Buffered:
    entry_id: str  # id in results:{cam}
    result: ResultMessage
    frame_key: tuple[int, int]
    arrived: float  # monotonic
    attempts: int = 0  # failed applications


@dataclass
class CameraState:
    """Everything a publisher holds for one camera while it owns the lease."""

    cam: str
    lease: Lock
    token: bytes
    machine: AlarmStateMachine
    hwm: tuple[int, int] = STREAM_ID_ZERO  # newest frame id applied (or given up on)
    hwm_seq: int = -1
    applied: SeqRanges = field(default_factory=SeqRanges)
    buffer: dict[tuple[int, int], _Buffered] = field(default_factory=dict)
    to_ack: list[str] = field(default_factory=list)  # result entries consumed, not yet committed
    events: list[AlarmEvent] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    notices: list[obs.StatusEvent] = field(default_factory=list)  # status events to commit
    # frames above hwm that a worker still holds (sorted; checked before each read);
    # None = unknown, re-check before applying anything that is not provably next
    outstanding: list[tuple[int, int]] | None = None
    outstanding_complete: bool = True  # the list holds every such frame
    drained: bool = False  # the last read returned everything the results stream had
    overlay_cache: tuple[str, bytes | None, str] | None = None
    renewed: float = 0.0


@dataclass
class PublisherStats:
    events: dict[str, int] = field(default_factory=lambda: {t: 0 for t in _EVENT_TYPES})
    results: int = 0
    duplicates: int = 0
    late: int = 0
    gaps_given_up: int = 0
    apply_failures: int = 0
    max_hold_s: float = 0.0
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
        clean = False
        try:
            while not self.stopping:
                obs.HEARTBEAT.beat("publisher")
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
            clean = True
        finally:
            self.close(commit=clean)
        return self.stats

    def close(self, commit: bool = True) -> None:
        """Release leases so another publisher takes over at once instead of after the TTL.

        ``commit=False`` after an unexpected error: hand back without writing anything, so the
        next owner redoes the uncommitted work from what Redis holds.
        """
        for cam in list(self.owned):
            state = self.owned.pop(cam)
            try:
                if commit:
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
        for state in self.owned.values():  # before the read: see _release_in_order
            self._check_outstanding(state)
        handled = self._read_results(self._block_ms())
        for cam in list(self.owned):
            state = self.owned[cam]
            self._release_in_order(state)
            if state.to_ack or state.events or state.dead_letters or state.notices:
                self._commit(state)
        return handled

    def _block_ms(self) -> int | None:
        """Block on the read only until the next held result's wait expires."""
        wait_s = self.settings.block_ms / 1000.0
        deadline = self.settings.max_gap_wait_ms / 1000.0
        now = time.monotonic()
        for state in self.owned.values():
            if state.buffer:
                head = state.buffer[min(state.buffer)]
                wait_s = min(wait_s, max(0.0, head.arrived + deadline - now))
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
        key = self.keys.publisher_state(cam)
        stored = self.client.hgetall(key)
        alarm_settings = self.settings.alarm_for(cam)
        mask = self.ignore_masks.get(cam)
        state = CameraState(
            cam=cam, lease=lease, token=token, machine=AlarmStateMachine(cam, alarm_settings, mask)
        )
        try:
            if stored.get(b"machine"):
                state.machine = AlarmStateMachine.from_dict(
                    json.loads(stored[b"machine"]), alarm_settings, mask
                )
            if stored.get(b"hwm_id"):
                state.hwm = parse_stream_id(stored[b"hwm_id"])
                state.hwm_seq = int(stored.get(b"hwm_seq", b"-1"))
            if stored.get(b"applied"):
                state.applied = SeqRanges(json.loads(stored[b"applied"]))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self._quarantine_state(state, key, stored, exc)
        state.renewed = time.monotonic()
        return state

    def _quarantine_state(
        self, state: CameraState, key: str, stored: dict[bytes, bytes], exc: Exception
    ) -> None:
        """An unreadable stored state must not crash-loop the camera: set it aside, say so loudly,
        and go on from a fresh machine (keeping the high-water mark if it is readable, so old
        results are not applied a second time)."""
        aside = f"{key}:corrupt:{time.time_ns()}"
        log.error(
            "stored publisher state is unreadable; moved aside, starting a fresh alarm machine",
            extra={"camera": state.cam, "error": str(exc), "moved_to": aside},
        )
        self.client.rename(key, aside)
        state.machine = AlarmStateMachine(
            state.cam, self.settings.alarm_for(state.cam), self.ignore_masks.get(state.cam)
        )
        state.applied = SeqRanges()
        try:
            state.hwm = parse_stream_id(stored.get(b"hwm_id", b"0-0"))
            state.hwm_seq = int(stored.get(b"hwm_seq", b"-1"))
        except ValueError:
            state.hwm, state.hwm_seq = STREAM_ID_ZERO, -1
        state.notices.append(
            self._notice("publisher.state_reset", state.cam, str(exc)[:500], {"moved_to": aside})
        )

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

    def _check_outstanding(self, state: CameraState) -> None:
        """Frames above the high-water mark that a worker still holds (delivered, not acked).

        Read BEFORE the results: a frame not pending at this moment has its result (or dead
        letter) written already, so a drained read that follows is sure to have seen it.
        """
        low = "-" if state.hwm == STREAM_ID_ZERO else f"({format_stream_id(state.hwm)}"
        try:
            rows = self.client.xpending_range(
                self.keys.frames(state.cam),
                self.worker_group,
                min=low,
                max="+",
                count=OUTSTANDING_PEEK,
            )
        except redis.ResponseError as exc:
            if is_permission_error(exc) or "NOGROUP" not in str(exc):
                raise
            rows = []  # no worker group (yet): nothing can be in flight
        state.outstanding = [parse_stream_id(r["message_id"]) for r in rows]
        state.outstanding_complete = len(rows) < OUTSTANDING_PEEK

    def _oldest_in_flight(self, cam: str) -> tuple[int, int] | None:
        """Oldest frame entry a worker still holds, whatever its age (status, tests)."""
        try:
            rows = self.client.xpending_range(
                self.keys.frames(cam), self.worker_group, min="-", max="+", count=1
            )
        except redis.ResponseError as exc:
            if is_permission_error(exc):
                raise
            return None  # no worker group yet
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
        """Hold a result in capture order, or settle it now (duplicate, late, unreadable)."""
        try:
            result = ResultMessage.from_fields(fields)
            if result.cam != state.cam:
                raise WireError("cam", result.cam, f"result in the stream of camera {state.cam!r}")
            frame_key = parse_stream_id(result.frame_id)
        except (WireError, ValueError) as exc:
            state.to_ack.append(entry_id)
            state.dead_letters.append(
                self._dead_letter(state, entry_id, fields, "malformed", str(exc))
            )
            return
        held = state.buffer.get(frame_key)
        if held is not None and held.entry_id == entry_id:
            return  # the same entry again (adopted, then re-read from our own pending list)
        if held is not None or (frame_key <= state.hwm and result.seq in state.applied):
            self._duplicate(state, entry_id)
            return
        if frame_key <= state.hwm:
            self._late(state, entry_id, result)
            return
        state.buffer[frame_key] = _Buffered(entry_id, result, frame_key, time.monotonic())

    def _duplicate(self, state: CameraState, entry_id: str) -> None:
        state.to_ack.append(entry_id)
        self.stats.duplicates += 1
        obs.DUPLICATES.labels(state.cam).inc()

    def _late(self, state: CameraState, entry_id: str, result: ResultMessage) -> None:
        """A result for a frame whose gap was given up: never applied, never silently lost."""
        state.to_ack.append(entry_id)
        self.stats.late += 1
        obs.LATE_RESULTS.labels(state.cam).inc()
        log.warning(
            "late result: its gap was given up, not applied",
            extra={"camera": state.cam, "seq": result.seq, "frame_id": result.frame_id},
        )
        state.notices.append(
            self._notice(
                "publisher.late_result",
                state.cam,
                "result arrived after its gap was given up; not applied to the alarm logic",
                {
                    "seq": result.seq,
                    "frame_id": result.frame_id,
                    "result_id": entry_id,
                    "anomalous": result.anomalous,
                    "score": result.score,
                    "hwm_id": format_stream_id(state.hwm),
                },
            )
        )

    def _release_in_order(self, state: CameraState) -> None:
        """Apply held results in capture order while no older frame can still bring one."""
        max_wait_s = self.settings.max_gap_wait_ms / 1000.0
        while state.buffer:
            frame_key = min(state.buffer)
            item = state.buffer[frame_key]
            if not state.drained:
                break  # an older result may sit in the part of the stream not read yet
            blocker = self._blocker(state, frame_key)
            if blocker is None:
                break  # not known: check again before the next read
            if blocker:
                held_s = time.monotonic() - item.arrived
                if held_s < max_wait_s and len(state.buffer) <= self.settings.window:
                    break
                self._give_up(state, blocker, item, held_s)
            del state.buffer[frame_key]
            if not self._apply(state, item):
                state.buffer[frame_key] = item  # retried next step, order kept
                break

    def _blocker(
        self, state: CameraState, frame_key: tuple[int, int]
    ) -> tuple[int, int] | bool | None:
        """An older frame still held by a worker (a tuple), False when none, None when unknown."""
        if state.outstanding is None:
            return None
        for pending in state.outstanding:
            if pending <= state.hwm:
                continue
            return pending if pending < frame_key else False
        return False if state.outstanding_complete else None

    def _give_up(
        self, state: CameraState, blocker: tuple[int, int], item: _Buffered, held_s: float
    ) -> None:
        self.stats.gaps_given_up += 1
        obs.GAPS_GIVEN_UP.labels(state.cam).inc()
        detail = {
            "awaited_frame_id": format_stream_id(blocker),
            "applied_seq": item.result.seq,
            "held_s": round(held_s, 3),
            "buffered": len(state.buffer),
        }
        log.warning("gave up waiting for a frame", extra={"camera": state.cam, **detail})
        state.notices.append(
            self._notice(
                "publisher.gap_given_up",
                state.cam,
                "a worker held an older frame too long; newer results applied without it",
                detail,
            )
        )

    def _apply(self, state: CameraState, item: _Buffered) -> bool:
        """Run one result through the alarm machine; False = it failed and will be retried."""
        result = item.result
        if result.seq in state.applied:  # the same capture seq under another frame id
            self._duplicate(state, item.entry_id)
            self._advance(state, item)
            return True
        point = state.machine.checkpoint()
        try:
            events = [self._finish_event(state, t) for t in state.machine.observe(result)]
        except _REDIS_TRANSIENT:
            state.machine.restore(point)
            raise
        except Exception as exc:
            state.machine.restore(point)
            return self._apply_failed(state, item, exc)
        state.applied.add(result.seq)
        state.applied.forget_below(result.seq - self.settings.dedupe_memory)
        state.to_ack.append(item.entry_id)
        state.events.extend(events)
        self._advance(state, item)
        self.stats.results += 1
        held_s = max(0.0, time.monotonic() - item.arrived)
        self.stats.max_hold_s = max(self.stats.max_hold_s, held_s)
        obs.PUBLISHER_HOLD.labels(state.cam).observe(held_s)
        return True

    def _advance(self, state: CameraState, item: _Buffered) -> None:
        state.hwm = item.frame_key
        state.hwm_seq = item.result.seq

    def _apply_failed(self, state: CameraState, item: _Buffered, exc: Exception) -> bool:
        item.attempts += 1
        self.stats.apply_failures += 1
        obs.APPLY_FAILURES.labels(state.cam).inc()
        log.error(
            "alarm processing failed for a result",
            exc_info=exc,
            extra={"camera": state.cam, "seq": item.result.seq, "attempt": item.attempts},
        )
        if item.attempts < self.settings.max_apply_attempts:
            return False
        detail = f"{type(exc).__name__}: {exc}"
        state.to_ack.append(item.entry_id)
        state.dead_letters.append(
            self._dead_letter(state, item.entry_id, item.result.to_fields(), "apply_failed", detail)
        )
        state.notices.append(
            self._notice(
                "publisher.apply_failed",
                state.cam,
                detail[:500],
                {"seq": item.result.seq, "frame_id": item.result.frame_id},
            )
        )
        self._advance(state, item)
        return True

    def _dead_letter(
        self, state: CameraState, entry_id: str, fields: Mapping[Any, Any], reason: str, detail: str
    ) -> dict[str, Any]:
        return deadletter_fields(
            dict(fields),
            reason=reason,
            detail=detail,
            source_key=self.keys.results(state.cam),
            source_id=entry_id,
            consumer=self.name,
        )

    def _notice(self, event: str, cam: str, reason: str, detail: dict[str, Any]) -> obs.StatusEvent:
        return obs.StatusEvent(
            event=event,  # type: ignore[arg-type]
            source="publisher",
            cam=cam,
            reason=reason,
            detail={"publisher": self.name, **detail},
        )

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
        """The overlay JPEG and "ok", or None and why not; a bad image never fails the event."""
        if not peak.heatmap:
            return None, "no_heatmap"
        rows = self.client.xrange(self.keys.frames(cam), peak.frame_id, peak.frame_id, count=1)
        if not rows:
            return None, "frame_trimmed"
        try:
            frame = decode_image(FrameMessage.from_fields(rows[0][1]))
        except WireError:
            return None, "frame_undecodable"
        try:
            levels = decode_result_png(peak.heatmap, (peak.map_h, peak.map_w), field="heatmap")
        except WireError:
            return None, "heatmap_undecodable"
        try:
            jpeg = render_overlay(
                frame, levels, regions, (peak.map_h, peak.map_w), self.settings.overlay_quality
            )
        except (cv2.error, ValueError, MemoryError) as exc:
            log.warning("overlay could not be drawn: %s", exc, extra={"camera": cam})
            return None, "render_failed"
        return jpeg, "ok"

    # ---------------------------------------------------------------------------- commit

    def _commit(self, state: CameraState) -> None:
        """Events + state + acks in one MULTI/EXEC, only while we still hold the lease."""
        if not (state.to_ack or state.events or state.dead_letters or state.notices):
            return
        lease_key = self.keys.publisher_lease(state.cam)
        cam = state.cam
        snapshot = {
            "machine": json.dumps(state.machine.to_dict(), separators=(",", ":")),
            "hwm_id": format_stream_id(state.hwm),
            "hwm_seq": state.hwm_seq,
            "applied": json.dumps(state.applied.ranges, separators=(",", ":")),
            "owner": self.name,
            "updated_ns": time.time_ns(),
        }
        events = list(state.events)
        notices = list(state.notices)
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
                if not mirror_later:
                    for notice in notices:
                        obs.emit_status(pipe, self.keys, notice)
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
            for notice in notices:
                obs.emit_status(self.client, self.keys, notice)
        state.to_ack.clear()
        state.events.clear()
        state.dead_letters.clear()
        state.notices.clear()
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
