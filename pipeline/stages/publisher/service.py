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

The alarm event carries the peak frame's overlay as the worker drew it: the publisher never reads
``frames:{cam}`` back (its ACL has no read on frames but XPENDING).

Why this module is long: the replay guarantee lives in how the lease, the capture-order hold,
apply-on-a-checkpoint and the fenced commit interlock; they are methods of one class over the
same per-camera state, kept in one file so the guarantee can be checked reading it top to bottom.
The per-camera data, its stored form and its quarantine are in ``state``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from redis.exceptions import LockError, WatchError

from pipeline.core import metrics
from pipeline.core.health import HEARTBEAT
from pipeline.core.lifecycle import GracefulStop
from pipeline.core.redis_conn import ensure_group, is_cluster, is_permission_error
from pipeline.core.stage_settings import PublisherSettings
from pipeline.core.status import StatusEvent, emit_status, emit_status_quietly
from pipeline.core.wire import (
    AlarmEvent,
    ResultMessage,
    StreamKeys,
    WireError,
    as_text,
    deadletter_fields,
)
from pipeline.stages.alarms import AlarmTransition, IgnoreMask
from pipeline.stages.publisher.state import (
    STREAM_ID_ZERO,
    Buffered,
    CameraState,
    PublisherStats,
    format_stream_id,
    load_state,
    parse_stream_id,
    publisher_notice,
    state_snapshot,
)

log = logging.getLogger(__name__)

OUTSTANDING_PEEK = 64  # pending frames above the high-water mark fetched per check
_REDIS_TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


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
                HEARTBEAT.beat("publisher")
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
                    metrics.REDIS_ERRORS.labels("publisher").inc()
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
            metrics.ALARM_ACTIVE.labels(cam).set(0)
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
            self._recover_lost_reads(state)
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
            state = load_state(
                self.client,
                self.keys,
                cam,
                self.settings.alarm_for(cam),
                self.ignore_masks.get(cam),
                lease=lease,
                token=token,
                publisher=self.name,
            )
            self.owned[cam] = state
            self._take_over_pending(state)
        except Exception:
            self.owned.pop(cam, None)
            lease.release()
            raise
        self.stats.acquired += 1
        metrics.ALARM_ACTIVE.labels(cam).set(1 if state.machine.active else 0)
        log.info(
            "serving camera",
            extra={
                "camera": cam,
                "publisher": self.name,
                "open_alarm": state.machine.alarm_id,
                "hwm": format_stream_id(state.hwm),
            },
        )

    def _take_over_pending(self, state: CameraState) -> None:
        """Results a previous owner read but never committed: claim them, then re-read ours."""
        for _ in range(100):  # bounded: a Redis 6.2 PEL can keep ids whose entries are gone
            if not self._adopt_orphans(state):
                break
        self._reread_own(state)

    def _recover_lost_reads(self, state: CameraState) -> None:
        """Re-read results delivered to us whose read reply never arrived.

        When Redis froze past the socket timeout, the client retries a read while the server
        also ran the first one: its results are in our pending list, unseen, and the frames
        behind them are acked, so nothing would wait for them. Everything pending to us between
        steps is in the buffer (applied results are acked with each commit); more means a lost
        reply, and the results are re-read before anything newer is applied.
        """
        summary = self.client.xpending(self.keys.results(state.cam), self.settings.group)
        mine = sum(
            int(c["pending"])
            for c in summary.get("consumers") or []
            if as_text(c["name"]) == self.name
        )
        if mine > len(state.buffer) + len(state.to_ack):
            log.warning(
                "results delivered to this publisher were never seen (a lost read reply); "
                "re-reading them",
                extra={"camera": state.cam, "pending": mine, "held": len(state.buffer)},
            )
            self._reread_own(state)

    def _reread_own(self, state: CameraState) -> None:
        """Our own pending results from the start (held ones are recognised by entry id)."""
        key = self.keys.results(state.cam)
        cursor = "0"
        while True:
            reply = self.client.xreadgroup(
                self.settings.group, self.name, {key: cursor}, count=self.settings.read_count
            )
            items = reply[0][1] if reply else []
            if not items:
                break
            for entry_id, fields in items:
                cursor = as_text(entry_id)
                self._accept(state, cursor, fields)

    def _adopt_orphans(self, state: CameraState, batch: int = 1000) -> int:
        """Claim results other publishers read but will never commit (they lost this camera).

        Only the lease holder may commit, so whatever another consumer holds is orphaned: a
        fenced-off or dead former owner. Our own pending entries are left alone (they are in
        our buffer).
        """
        key = self.keys.results(state.cam)
        rows = self.client.xpending_range(key, self.settings.group, "-", "+", batch)
        orphans = [r["message_id"] for r in rows if as_text(r["consumer"]) != self.name]
        if not orphans:
            return 0
        claimed = self.client.xclaim(key, self.settings.group, self.name, 0, orphans)
        for entry_id, fields in claimed:
            if entry_id is not None:
                self._accept(state, as_text(entry_id), fields or {})
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
            key = as_text(key)
            cam = key[key.index("{") + 1 : key.rindex("}")]
            state = self.owned.get(cam)
            if state is None:
                continue  # lost the lease meanwhile: the new owner claims these
            state.drained = len(items) < self.settings.read_count
            for entry_id, fields in items:
                self._accept(state, as_text(entry_id), fields)
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
        state.buffer[frame_key] = Buffered(entry_id, result, frame_key, time.monotonic())

    def _duplicate(self, state: CameraState, entry_id: str) -> None:
        state.to_ack.append(entry_id)
        self.stats.duplicates += 1
        metrics.DUPLICATES.labels(state.cam).inc()

    def _late(self, state: CameraState, entry_id: str, result: ResultMessage) -> None:
        """A result for a frame whose gap was given up: never applied, never silently lost."""
        state.to_ack.append(entry_id)
        self.stats.late += 1
        metrics.LATE_RESULTS.labels(state.cam).inc()
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
        self, state: CameraState, blocker: tuple[int, int], item: Buffered, held_s: float
    ) -> None:
        self.stats.gaps_given_up += 1
        metrics.GAPS_GIVEN_UP.labels(state.cam).inc()
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

    def _apply(self, state: CameraState, item: Buffered) -> bool:
        """Run one result through the alarm machine; False = it failed and will be retried."""
        result = item.result
        if result.seq in state.applied:  # the same capture seq under another frame id
            self._duplicate(state, item.entry_id)
            self._advance(state, item)
            return True
        point = state.machine.checkpoint()
        try:
            events = [self._finish_event(t) for t in state.machine.observe(result)]
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
        metrics.PUBLISHER_HOLD.labels(state.cam).observe(held_s)
        return True

    def _advance(self, state: CameraState, item: Buffered) -> None:
        state.hwm = item.frame_key
        state.hwm_seq = item.result.seq

    def _apply_failed(self, state: CameraState, item: Buffered, exc: Exception) -> bool:
        item.attempts += 1
        self.stats.apply_failures += 1
        metrics.APPLY_FAILURES.labels(state.cam).inc()
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

    def _notice(self, event: str, cam: str, reason: str, detail: dict[str, Any]) -> StatusEvent:
        return publisher_notice(self.name, event, cam, reason, detail)

    # ---------------------------------------------------------------------------- events

    def _finish_event(self, transition: AlarmTransition) -> AlarmEvent:
        overlay, status = self._overlay(transition)
        return transition.event.model_copy(
            update={
                "emitted_ns": time.time_ns(),
                "publisher": self.name,
                "overlay": overlay,
                "overlay_status": status,
            }
        )

    def _overlay(self, transition: AlarmTransition) -> tuple[bytes | None, str]:
        """The peak frame's overlay as its worker drew it; frames are never read back here."""
        if not self.settings.overlays:
            return None, "disabled"
        if transition.peak.overlay:
            return transition.peak.overlay, "ok"
        return None, "no_overlay"

    # ---------------------------------------------------------------------------- commit

    def _commit(self, state: CameraState) -> None:
        """Events + state + acks in one MULTI/EXEC, only while we still hold the lease."""
        if not (state.to_ack or state.events or state.dead_letters or state.notices):
            return
        lease_key = self.keys.publisher_lease(state.cam)
        cam = state.cam
        snapshot = state_snapshot(state, self.name)
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
                        emit_status(pipe, self.keys, notice)
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
                emit_status(self.client, self.keys, notice)
        state.to_ack.clear()
        state.events.clear()
        state.dead_letters.clear()
        state.notices.clear()
        for event in events:
            self._count_event(event)

    def _count_event(self, event: AlarmEvent) -> None:
        self.stats.events[event.type] += 1
        metrics.ALARMS.labels(event.cam, event.type.removeprefix("alarm.")).inc()
        metrics.ALARM_ACTIVE.labels(event.cam).set(0 if event.type == "alarm.ended" else 1)
        metrics.END_TO_END_LATENCY.labels(event.cam, "publisher").observe(
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
        detail = {"publisher": self.name, "cameras": sorted(self.owned)}
        status = StatusEvent(event=event, source="publisher", reason=self.name, detail=detail)
        emit_status_quietly(self.client, self.keys, status, log)
