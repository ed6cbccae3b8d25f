"""The inference worker: frames:{cam} -> batches -> model -> results:{cam}, at least once, no loss.

Delivery rules (Redis Streams is at-least-once; see research/streaming.md section 4):

- One consumer group ("workers") over all configured camera streams; the consumer name is stable
  across restarts, so at start the worker re-reads its OWN pending entries (id 0) and finishes them.
- A heartbeat key (``worker.liveness``) says the worker is alive. Every ``claim_interval_s`` it
  claims the pending frames of consumers without one (dead: their frames come back within about
  ``heartbeat_ttl_ms`` + ``claim_interval_s``), and XAUTOCLAIMs entries any consumer left idle
  for longer than ``claim_min_idle_ms`` (a hung worker that still beats), its own lost ones
  included.
- A re-read or claimed entry runs alone (batch of 1), so a frame that kills the process only
  raises its own delivery count; once that count exceeds ``max_deliveries`` it is dead-lettered.
  A frame the model raises on is retried alone, stays pending meanwhile and is re-read after a
  pause (raising its count) instead of crashing the worker; failures on several different frames
  in a row mean a broken engine, and then the worker exits for its supervisor to restart it.
- The result XADD and the frame XACK run in ONE atomic script call per camera and batch (all
  keys share the ``{cam}`` hash tag, so this works on Redis Cluster). Per frame the script adds
  the result only while the frame is still pending in the group and acks it only once the result
  exists: a slow worker whose frame a peer claimed and finished adds no second result (no reader
  ever sees one), and no frame is acked without a record of what became of it.
- Frames that cannot be used (malformed, oversize, undecodable, poison, too old, trimmed) go to
  ``deadletter:{cam}`` with a reason in the same atomic step as their XACK: nothing vanishes.
- SIGTERM/SIGINT: stop reading, finish every frame already read, publish, ack, exit 0.

Throughput: the main thread reads, decodes and runs the model; a second thread turns the maps
into regions/PNGs and writes results, so that CPU and Redis work overlaps the next model call
(at most two batches queue up behind the GPU).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
import torch

from pipeline import observability as obs
from pipeline.lifecycle import GracefulStop
from pipeline.redis_conn import (
    RedisPermissionError,
    ensure_group,
    is_cluster,
    is_permission_error,
)
from pipeline.stage_settings import WorkerSettings
from pipeline.wire import (
    FieldMap,
    FrameMessage,
    ImageTooLargeError,
    ResultMessage,
    StreamKeys,
    WireError,
    check_frame,
    deadletter_fields,
)
from worker.batching import BatchCollector
from worker.decode import decode_frames
from worker.liveness import Heartbeat, dead_consumers
from worker.postprocess import postprocess

if TYPE_CHECKING:
    from models.inference import BatchPrediction, InferenceEngine

log = logging.getLogger(__name__)

# KEYS: frames, results, deadletter of one camera (one hash tag: one Cluster slot).
# ARGV: group, results MAXLEN, deadletter MAXLEN, then per frame: entry id, "r" (result) or "d"
# (dead letter), field count, fields... Per frame it returns the new entry id, 0 when the frame is
# no longer pending (a peer finished it), or "!<error>" when the XADD failed (frame left pending).
# A script runs atomically, so no reader ever sees a second entry for a frame, and a frame is only
# acked after its entry exists.
MODEL_RETRY_DELAY_S = 1.0  # pause before re-reading a frame the model failed on
BROKEN_ENGINE_FAILURES = 3  # different frames failing in a row: the engine, not the frames
MAX_DEADLETTER_FIELDS = 256  # original fields copied into a dead letter

PUBLISH_SCRIPT = """
local group = ARGV[1]
local out = {}
local i = 4
while i <= #ARGV do
  local id, kind, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if #redis.call('XPENDING', KEYS[1], group, id, id, 1) == 0 then
    out[#out + 1] = 0
  else
    local key, maxlen = KEYS[2], ARGV[2]
    if kind == 'd' then key, maxlen = KEYS[3], ARGV[3] end
    local cmd = {'XADD', key, 'MAXLEN', '~', maxlen, '*'}
    for j = i + 3, i + 2 + n do cmd[#cmd + 1] = ARGV[j] end
    local added = redis.pcall(unpack(cmd))
    if type(added) == 'table' and added.err then
      out[#out + 1] = '!' .. added.err
    else
      redis.call('XACK', KEYS[1], group, id)
      out[#out + 1] = added
    end
  end
  i = i + 3 + n
end
return out
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class FrameEntry:
    """A frame entry read from Redis and owned by this consumer until it is acked."""

    cam: str
    entry_id: str
    fields: dict[bytes, bytes]
    read_ns: int
    deliveries: int = 1
    frame: FrameMessage | None = None


@dataclass
class _Outcome:
    """What one frame entry turns into: a result or a dead letter (plus the ack either way)."""

    entry: FrameEntry
    result: ResultMessage | None = None
    reason: str | None = None
    detail: str = ""


@dataclass
class _Scored:
    """A model call's output for frames that still need post-processing and publishing."""

    entries: list[FrameEntry]
    pred: BatchPrediction
    decode_s: float
    infer_s: float


class _Background:
    """One thread that runs submitted jobs in order; a bounded queue keeps it at most
    ``depth`` batches behind, and its first error is raised in the submitting thread."""

    def __init__(self, depth: int = 2) -> None:
        self.closed = False
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="worker-publish", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def drain(self) -> None:
        """Wait until every submitted job ran; re-raise the first failure."""
        self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure, skip: the frames stay pending
                    job()
            except BaseException as exc:
                self._error = exc
            finally:
                self._queue.task_done()


@dataclass
class WorkerStats:
    """Counters of one ``run`` (tests and the exit log line)."""

    batches: int = 0
    results: int = 0
    anomalous: int = 0
    dead_letters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duplicates: int = 0
    recovered: int = 0
    claimed: int = 0


class FrameWorker(GracefulStop):
    """Consumes camera streams with a consumer group and publishes one result per frame.

    ``engines`` maps camera id -> InferenceEngine; cameras sharing one engine object share its
    batches (per-model batching across cameras).
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        settings: WorkerSettings,
        engines: Mapping[str, InferenceEngine],
        *,
        consumer: str | None = None,
    ) -> None:
        if not engines:
            raise ValueError("the worker needs at least one camera -> model route")
        self.client = client
        self.keys = keys
        self.settings = settings
        self.engines = dict(engines)
        self.consumer = consumer or settings.consumer_name()
        self.cameras = sorted(self.engines)
        self._init_stop()
        self._retry_at: float | None = None  # when to re-read frames the model failed on
        self._failing: set[tuple[str, str]] = set()  # frames failed since the last success
        self._collectors: dict[int, BatchCollector[FrameEntry]] = {}
        self._engine_by_id: dict[int, InferenceEngine] = {}
        for engine in self.engines.values():
            key = id(engine)
            if key not in self._collectors:
                self._engine_by_id[key] = engine
                self._collectors[key] = BatchCollector(
                    settings.batch_size, settings.max_wait_ms / 1000.0
                )
        self._claim_cursor = dict.fromkeys(self.cameras, "0-0")
        self._is_cluster = is_cluster(client)
        self._background = _Background()
        self._publish_script = client.register_script(PUBLISH_SCRIPT)
        self._heartbeat = Heartbeat(
            client, keys.worker_alive(self.consumer), settings.heartbeat_ttl_ms
        )
        self.stats = WorkerStats()

    # ------------------------------------------------------------------------------- control

    def run(self, max_results: int | None = None, idle_exit_s: float | None = None) -> WorkerStats:
        """Serve until stopped (or ``max_results`` written, or idle for ``idle_exit_s``)."""
        self.ensure_groups()
        self._heartbeat.start()
        self._emit_status("process.started")
        log.info(
            "worker started",
            extra={
                "consumer": self.consumer,
                "cameras": self.cameras,
                "group": self.settings.group,
            },
        )
        next_claim = time.monotonic() + self.settings.claim_interval_s
        last_work = time.monotonic()
        need_recovery = True
        if self._background.closed:
            self._background = _Background()
        try:
            while not self.stopping:
                obs.HEARTBEAT.beat("worker")
                try:
                    if need_recovery or self._retry_due():
                        self._retry_at = None
                        self._process_ready(force=True)  # so only stranded frames are re-read
                        self._background.drain()
                        if self.recover_own_pending():
                            last_work = time.monotonic()
                        need_recovery = False
                    if time.monotonic() >= next_claim:
                        self.claim_from_dead()
                        self.claim_abandoned()
                        self._update_pending_gauges()
                        next_claim = time.monotonic() + self.settings.claim_interval_s
                    if self._read_once() or any(len(c) for c in self._collectors.values()):
                        last_work = time.monotonic()
                    if self._process_ready(force=False):
                        last_work = time.monotonic()  # a long batch is work, not idleness
                except redis.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    log.warning("consumer group vanished (stream deleted?); recreating it")
                    self.ensure_groups()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    obs.REDIS_ERRORS.labels("worker").inc()
                    log.warning("redis unavailable, retrying: %s", exc)
                    self._drop_buffered()  # still pending in Redis: recovered after reconnect
                    self._settle_background()
                    need_recovery = True
                    self._stop.wait(1.0)
                if max_results is not None and self.stats.results >= max_results:
                    break
                idle_s = time.monotonic() - last_work
                if idle_exit_s is not None and idle_s > idle_exit_s and self._retry_at is None:
                    break
            self._process_ready(force=True)
            self._background.drain()
        finally:
            self._settle_background()
            self._background.close()
            self._heartbeat.stop()
            self._emit_status("process.stopped")
            log.info(
                "worker stopped",
                extra={
                    "consumer": self.consumer,
                    "results": self.stats.results,
                    "dead_letters": dict(self.stats.dead_letters),
                },
            )
        return self.stats

    # ------------------------------------------------------------------------------- reading

    def ensure_groups(self) -> None:
        for cam in self.cameras:
            frames, start = self.keys.frames(cam), self.settings.create_group_from
            ensure_group(self.client, frames, self.settings.group, start)

    def _read_once(self) -> int:
        """One XREADGROUP ">" over all cameras; blocks at most until the next batch deadline."""
        waits = [c.time_left() for c in self._collectors.values()]
        pending = [w for w in waits if w is not None]
        if pending and min(pending) <= 0:
            return 0
        block_ms = self.settings.block_ms
        if pending:
            block_ms = max(1, min(block_ms, int(min(pending) * 1000)))
        count = self.settings.read_count or self.settings.batch_size
        rooms = [c.room for c in self._collectors.values() if len(c)]
        if rooms:
            count = max(1, min(count, min(rooms)))
        streams = {self.keys.frames(cam): ">" for cam in self.cameras}
        reply = self._xreadgroup(streams, count, block_ms)
        now = time.time_ns()
        entries = []
        for key, items in reply:
            cam = self._cam_of(key)
            for entry_id, fields in items:
                entries.append(FrameEntry(cam, _text(entry_id), fields or {}, now))
        for entry in entries:
            self._collectors[id(self.engines[entry.cam])].add(entry)
        return len(entries)

    def _xreadgroup(self, streams: dict[str, str], count: int, block_ms: int | None) -> list:
        if not self._is_cluster or len(streams) == 1:
            return (
                self.client.xreadgroup(
                    self.settings.group, self.consumer, streams, count=count, block=block_ms
                )
                or []
            )
        # Cluster: one stream per slot, so poll each without blocking and nap when all are empty
        reply = []
        for key, cursor in streams.items():
            got = self.client.xreadgroup(self.settings.group, self.consumer, {key: cursor}, count)
            reply.extend(got or [])
        if not reply and block_ms:
            self._stop.wait(min(block_ms, 20) / 1000.0)
        return reply

    def _retry_due(self) -> bool:
        return self._retry_at is not None and time.monotonic() >= self._retry_at

    def _cam_of(self, key: bytes | str) -> str:
        key = _text(key)
        return key[key.index("{") + 1 : key.rindex("}")]

    def recover_own_pending(self) -> int:
        """Re-read this consumer's pending entries (id 0) and finish them one at a time."""
        done = 0
        for cam in self.cameras:
            key = self.keys.frames(cam)
            cursor = "0"
            while not self.stopping:
                obs.HEARTBEAT.beat("worker")
                reply = self.client.xreadgroup(
                    self.settings.group, self.consumer, {key: cursor}, count=1
                )
                items = reply[0][1] if reply else []
                if not items:
                    break
                entry_id, fields = items[0]
                cursor = _text(entry_id)
                entry = FrameEntry(cam, cursor, fields or {}, time.time_ns())
                entry.deliveries = self._delivery_count(cam, cursor)
                obs.REDELIVERIES.labels(cam).inc()
                self.stats.recovered += 1
                self._process_batch(self.engines[cam], [entry])
                self._background.drain()  # finish it before the next re-read bumps a count
                done += 1
        self._background.drain()
        if done:
            log.info("finished own pending entries from a previous run", extra={"count": done})
        return done

    def claim_from_dead(self) -> int:
        """Claim the pending frames of consumers whose heartbeat expired, and finish them singly."""
        claimed = 0
        min_idle = self.settings.dead_claim_min_idle_ms
        for cam in self.cameras:
            key = self.keys.frames(cam)
            group = self.settings.group
            for dead in dead_consumers(
                self.client, key, group, self.keys.worker_alive, self.consumer
            ):
                if self.stopping:
                    return claimed
                rows = self.client.xpending_range(
                    key, group, "-", "+", self.settings.batch_size, consumername=dead, idle=min_idle
                )
                ids = [_text(r["message_id"]) for r in rows]
                if not ids:
                    continue
                entries = self.client.xclaim(key, group, self.consumer, min_idle, ids)
                got = {_text(e): f for e, f in entries if e is not None}
                # Redis 6.2 returns trimmed entries without fields; Redis 7 drops them from the
                # PEL silently (nothing left to score, and the publisher's gap closes at once)
                vanished = [i for i in ids if i in got and not got[i]]
                if vanished:
                    self._record_vanished(cam, vanished)
                log.warning(
                    "claiming the frames of a dead worker",
                    extra={"camera": cam, "dead": dead, "count": len(got)},
                )
                for entry_id, fields in got.items():
                    if not fields:
                        continue
                    entry = FrameEntry(cam, entry_id, fields, time.time_ns())
                    entry.deliveries = self._delivery_count(cam, entry_id)
                    obs.REDELIVERIES.labels(cam).inc()
                    self.stats.claimed += 1
                    claimed += 1
                    self._process_batch(self.engines[cam], [entry])
                    self._background.drain()
        return claimed

    def claim_abandoned(self) -> int:
        """XAUTOCLAIM entries idle > claim_min_idle_ms (dead peers) and finish them singly."""
        claimed = 0
        for cam in self.cameras:
            key = self.keys.frames(cam)
            budget = self.settings.batch_size
            while budget > 0 and not self.stopping:
                reply = self.client.xautoclaim(
                    key,
                    self.settings.group,
                    self.consumer,
                    self.settings.claim_min_idle_ms,
                    start_id=self._claim_cursor[cam],
                    count=1,
                )
                cursor, items = _text(reply[0]), reply[1]
                deleted = reply[2] if len(reply) > 2 else []
                self._claim_cursor[cam] = cursor
                if deleted:
                    self._record_vanished(cam, [_text(d) for d in deleted])
                for entry_id, fields in items:
                    entry = FrameEntry(cam, _text(entry_id), fields or {}, time.time_ns())
                    entry.deliveries = self._delivery_count(cam, entry.entry_id)
                    obs.REDELIVERIES.labels(cam).inc()
                    self.stats.claimed += 1
                    claimed += 1
                    budget -= 1
                    self._process_batch(self.engines[cam], [entry])
                    self._background.drain()
                if cursor == "0-0":
                    break
        self._background.drain()
        if claimed:
            log.info("claimed abandoned frame entries", extra={"count": claimed})
        return claimed

    def _delivery_count(self, cam: str, entry_id: str) -> int:
        rows = self.client.xpending_range(
            self.keys.frames(cam), self.settings.group, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 1

    def _record_vanished(self, cam: str, entry_ids: list[str]) -> None:
        """Pending entries trimmed from the stream before anyone scored them: say so."""
        pipe = self.client.pipeline(transaction=True)
        for entry_id in entry_ids:
            pipe.xadd(
                self.keys.deadletter(cam),
                deadletter_fields(
                    None,
                    reason="trimmed",
                    detail="pending entry was trimmed from the stream before it was scored",
                    source_key=self.keys.frames(cam),
                    source_id=entry_id,
                    consumer=self.consumer,
                ),
                maxlen=self.settings.deadletter_maxlen,
                approximate=True,
            )
        pipe.execute()
        obs.DEAD_LETTERS.labels(cam, "trimmed").inc(len(entry_ids))
        obs.FRAMES_DROPPED.labels(cam, "trimmed").inc(len(entry_ids))
        self.stats.dead_letters["trimmed"] += len(entry_ids)

    def _update_pending_gauges(self) -> None:
        for cam in self.cameras:
            summary = self.client.xpending(self.keys.frames(cam), self.settings.group)
            obs.PENDING_ENTRIES.labels(cam, self.settings.group).set(int(summary["pending"]))

    def _settle_background(self) -> None:
        """Let queued publish jobs finish; their failures leave frames pending (recovered later)."""
        while True:
            try:
                self._background.drain()
                return
            except Exception as exc:
                log.warning("publishing a batch failed; its frames stay pending: %s", exc)

    def _drop_buffered(self) -> None:
        for collector in self._collectors.values():
            while len(collector):
                collector.take()

    # ---------------------------------------------------------------------------- processing

    def _process_ready(self, force: bool) -> int:
        """Run every batch that is due; returns how many batches ran."""
        done = 0
        for key, collector in self._collectors.items():
            while len(collector) and (force or collector.ready()):
                self._process_batch(self._engine_by_id[key], collector.take())
                done += 1
        return done

    def _process_batch(self, engine: InferenceEngine, entries: list[FrameEntry]) -> None:
        outcomes: list[_Outcome] = []
        usable: list[FrameEntry] = []
        for entry in entries:
            rejected = self._triage(entry)
            if rejected is None:
                usable.append(entry)
            else:
                outcomes.append(rejected)
        scored: list[_Scored] = []
        if usable:
            rejected, scored = self._score(engine, usable)
            outcomes.extend(rejected)
        # the GPU moves on to the next batch while this one is post-processed and published
        self._background.submit(lambda: self._finish(engine, outcomes, scored))

    def _triage(self, entry: FrameEntry) -> _Outcome | None:
        """Reject what must not reach the model; parse the rest."""
        cam = entry.cam
        if not entry.fields:
            return _Outcome(entry, reason="trimmed", detail="entry body is gone from the stream")
        if entry.deliveries > self.settings.max_deliveries:
            return _Outcome(
                entry,
                reason="poison",
                detail=f"delivered {entry.deliveries} times (limit {self.settings.max_deliveries})",
            )
        size = len(entry.fields.get(b"data", b""))
        if size > self.settings.max_frame_bytes:
            return _Outcome(
                entry,
                reason="oversize",
                detail=f"data is {size} bytes, max_frame_bytes={self.settings.max_frame_bytes}",
            )
        try:
            frame = FrameMessage.from_fields(entry.fields)
        except WireError as exc:
            return _Outcome(entry, reason="malformed", detail=str(exc))
        if frame.cam != cam:
            return _Outcome(
                entry, reason="malformed", detail=f"cam field {frame.cam!r} in stream of {cam!r}"
            )
        if self.settings.max_age_s is not None:
            age_s = (entry.read_ns - frame.ts_ns) / 1e9
            if age_s > self.settings.max_age_s:
                return _Outcome(
                    entry,
                    reason="too_old",
                    detail=f"captured {age_s:.3f} s ago, max_age_s={self.settings.max_age_s}",
                )
        try:  # header only: no decoder ever allocates for a size nobody checked
            check_frame(frame, max_pixels=self.settings.max_frame_pixels)
        except ImageTooLargeError as exc:
            return _Outcome(entry, reason="oversize", detail=str(exc))
        except WireError as exc:  # enc names the other format (malformed), or bad bytes/size
            reason = "malformed" if exc.field == "enc" else "undecodable"
            return _Outcome(entry, reason=reason, detail=str(exc))
        entry.frame = frame
        return None

    def _score(
        self, engine: InferenceEngine, entries: list[FrameEntry]
    ) -> tuple[list[_Outcome], list[_Scored]]:
        """Decode and run the model (GPU side); frames that do not decode become dead letters."""
        model = engine.info.name
        frames = [e.frame for e in entries if e.frame is not None]
        t0 = time.perf_counter()
        decoded = decode_frames(
            frames, engine.device, engine.info.image_size, self.settings.max_frame_pixels
        )
        decode_s = time.perf_counter() - t0
        obs.DECODE_LATENCY.labels(model).observe(decode_s)
        rejected: list[_Outcome] = []
        by_shape: dict[tuple[int, ...], list[tuple[FrameEntry, torch.Tensor]]] = defaultdict(list)
        for entry, image in zip(entries, decoded, strict=True):
            if isinstance(image, WireError):
                rejected.append(_Outcome(entry, reason="undecodable", detail=str(image)))
            else:
                by_shape[tuple(image.shape)].append((entry, image))
        scored = [s for group in by_shape.values() for s in self._infer(engine, group, decode_s)]
        return rejected, scored

    def _infer(
        self,
        engine: InferenceEngine,
        group: list[tuple[FrameEntry, torch.Tensor]],
        decode_s: float,
    ) -> list[_Scored]:
        model = engine.info.name
        batch = torch.stack([image for _, image in group])
        t0 = time.perf_counter()
        try:
            pred = engine.predict(batch)
        except (RuntimeError, ValueError) as exc:
            if len(group) > 1:
                log.exception("batch of %d failed; retrying its frames one by one", len(group))
                return [s for item in group for s in self._infer(engine, [item], decode_s)]
            self._model_failed(group[0][0], exc)
            return []
        self._failing.clear()
        infer_s = time.perf_counter() - t0
        obs.BATCHES.labels(model).inc()
        obs.BATCH_SIZE.labels(model).observe(len(group))
        obs.INFER_LATENCY.labels(model).observe(infer_s)
        self.stats.batches += 1
        return [_Scored([entry for entry, _ in group], pred, decode_s, infer_s)]

    def _model_failed(self, entry: FrameEntry, exc: Exception) -> None:
        """A lone frame the model cannot run stays pending and is retried after a pause.

        Each retry re-reads it (its delivery count grows), so a frame that always breaks the model
        ends as a ``poison`` dead letter without taking the process down. Failures on several
        different frames in a row mean the engine itself is broken (say a dead CUDA context):
        then the worker exits so that its supervisor restarts it with a fresh one.
        """
        self._failing.add((entry.cam, entry.entry_id))
        if len(self._failing) >= BROKEN_ENGINE_FAILURES:
            raise RuntimeError(
                f"the model failed on {len(self._failing)} different frames in a row: {exc}"
            ) from exc
        log.error(
            "model failed on a frame; it stays pending and is retried",
            exc_info=exc,
            extra={"camera": entry.cam, "entry": entry.entry_id, "deliveries": entry.deliveries},
        )
        self._retry_at = time.monotonic() + MODEL_RETRY_DELAY_S

    def _finish(
        self, engine: InferenceEngine, rejected: list[_Outcome], scored: list[_Scored]
    ) -> None:
        """CPU side, off the GPU thread: maps -> regions/PNGs -> results, then publish + ack."""
        outcomes = list(rejected)
        for batch in scored:
            outcomes.extend(self._results(engine, batch))
        self._publish(outcomes)

    def _results(self, engine: InferenceEngine, scored: _Scored) -> list[_Outcome]:
        info, pred = engine.info, scored.pred
        outcomes = []
        for i, entry in enumerate(scored.entries):
            frame = entry.frame
            assert frame is not None
            anomalous = bool(pred.anomalous[i])
            post = postprocess(
                pred.maps[i],
                info.threshold,
                frame_size=(frame.h, frame.w) if self.settings.map_resolution == "frame" else None,
                with_images=anomalous or self.settings.mask_for_normal,
                find=anomalous or self.settings.mask_for_normal,
            )
            result = ResultMessage(
                cam=entry.cam,
                frame_id=entry.entry_id,
                seq=frame.seq,
                ts_ns=frame.ts_ns,
                score=float(pred.scores[i]),
                score_norm=float(np.clip(pred.normalized[i], 0.0, 1.0)),
                anomalous=anomalous,
                threshold=float(info.threshold),
                model=info.name,
                model_version=info.version,
                model_sha256=info.sha256,
                t_queue_ms=max(0.0, (entry.read_ns - frame.ts_ns) / 1e6),
                t_decode_ms=scored.decode_s * 1000.0,
                t_infer_ms=scored.infer_s * 1000.0,
                frame_w=frame.w,
                frame_h=frame.h,
                map_w=post.map_w,
                map_h=post.map_h,
                regions=post.regions,
                mask=post.mask_png,
                heatmap=post.heatmap_png,
                batch=len(scored.entries),
                worker=self.consumer,
            )
            outcomes.append(_Outcome(entry, result=result))
        return outcomes

    # ---------------------------------------------------------------------------- publishing

    def _publish(self, outcomes: Iterable[_Outcome]) -> None:
        by_cam: dict[str, list[_Outcome]] = defaultdict(list)
        for outcome in outcomes:
            by_cam[outcome.entry.cam].append(outcome)
        for cam, items in by_cam.items():
            items.sort(key=lambda o: o.result.seq if o.result else -1)
            self._publish_camera(cam, items)

    def _publish_camera(self, cam: str, outcomes: list[_Outcome]) -> None:
        """Write each frame's result (or dead letter) and XACK it in one atomic script call.

        The script adds an entry only for a frame still pending in the group, and acks a frame
        only after its entry was added: a frame a peer already finished gets no second entry
        (not even briefly), and no frame is acked without a record of what became of it.
        """
        done_ns = time.time_ns()
        for outcome in outcomes:
            if outcome.result is not None:
                outcome.result = outcome.result.model_copy(
                    update={
                        "done_ns": done_ns,
                        "t_total_ms": max(0.0, (done_ns - outcome.result.ts_ns) / 1e6),
                    }
                )
        replies = self._publish_atomically(cam, [(o, self._entry_fields(o)) for o in outcomes])
        failed: list[tuple[_Outcome, str]] = []
        duplicates = 0
        for outcome, reply in zip(outcomes, replies, strict=True):
            if reply is None:
                duplicates += 1
            elif reply.startswith("!"):
                failed.append((outcome, reply[1:]))
            else:
                self._count(outcome)
        if duplicates:
            self.stats.duplicates += duplicates
            log.warning(
                "frames were already acked by another consumer; our copies were not written",
                extra={"camera": cam, "count": duplicates},
            )
        if failed:
            self._rescue(cam, failed)

    def _entry_fields(self, outcome: _Outcome) -> FieldMap:
        if outcome.result is not None:
            return outcome.result.to_fields()
        return self._deadletter_fields(outcome)

    def _publish_atomically(
        self, cam: str, items: list[tuple[_Outcome, FieldMap]]
    ) -> list[str | None]:
        """One script call: per item the new entry id, None (acked elsewhere) or "!error"."""
        args: list[Any] = [
            self.settings.group,
            self.settings.results_maxlen,
            self.settings.deadletter_maxlen,
        ]
        for outcome, fields in items:
            args += [outcome.entry.entry_id, "r" if outcome.result else "d", 2 * len(fields)]
            for name, value in fields.items():
                args += [name, value]
        keys = [self.keys.frames(cam), self.keys.results(cam), self.keys.deadletter(cam)]
        replies = self._publish_script(keys=keys, args=args)
        if any(isinstance(r, bytes | str) and is_permission_error(r) for r in replies):
            raise RedisPermissionError(f"the result script was denied by the ACL: {replies}")
        return [None if reply == 0 else _text(reply) for reply in replies]

    def _rescue(self, cam: str, failed: list[tuple[_Outcome, str]]) -> None:
        """A result could not be written (its frame is still pending): dead-letter the frame."""
        rescues = []
        for outcome, error in failed:
            log.error(
                "result could not be written; dead-lettering the frame",
                extra={"camera": cam, "entry": outcome.entry.entry_id, "error": error},
            )
            dead = _Outcome(outcome.entry, reason="publish_failed", detail=error)
            rescues.append((dead, self._deadletter_fields(dead)))
        for (dead, _), reply in zip(rescues, self._publish_atomically(cam, rescues), strict=True):
            if reply is not None and reply.startswith("!"):
                # neither a result nor a dead letter can be written: the frame stays pending and
                # is retried once claim_min_idle_ms passes (its delivery count keeps growing)
                obs.REDIS_ERRORS.labels("worker").inc()
                log.error(
                    "frame kept pending: its dead letter could not be written either",
                    extra={"camera": cam, "entry": dead.entry.entry_id, "error": reply[1:]},
                )
            elif reply is not None:
                self._count(dead)

    def _deadletter_fields(self, outcome: _Outcome) -> dict:
        entry = outcome.entry
        original = entry.fields
        if len(original) > MAX_DEADLETTER_FIELDS:  # junk entry; Lua cannot unpack thousands
            original = dict(list(original.items())[:MAX_DEADLETTER_FIELDS])
        return deadletter_fields(  # payloads above DEADLETTER_MAX_VALUE_BYTES are left out
            original,
            reason=outcome.reason or "malformed",
            detail=outcome.detail,
            source_key=self.keys.frames(entry.cam),
            source_id=entry.entry_id,
            consumer=self.consumer,
            deliveries=entry.deliveries,
            # too_old: the frame stays in frames:{cam}; a second copy of a backlog would double RAM
            drop=("data",) if outcome.reason == "too_old" else (),
        )

    def _count(self, outcome: _Outcome) -> None:
        cam = outcome.entry.cam
        result = outcome.result
        if result is None:
            reason = outcome.reason or "malformed"
            self.stats.dead_letters[reason] += 1
            obs.DEAD_LETTERS.labels(cam, reason).inc()
            if reason in ("too_old", "trimmed"):
                obs.FRAMES_DROPPED.labels(cam, reason).inc()
            log.warning(
                "frame dead-lettered",
                extra={"camera": cam, "entry": outcome.entry.entry_id, "reason": reason},
            )
            return
        self.stats.results += 1
        obs.FRAMES_SCORED.labels(cam, result.model).inc()
        obs.QUEUE_WAIT.labels(cam).observe(result.t_queue_ms / 1000.0)
        obs.END_TO_END_LATENCY.labels(cam, "worker").observe(result.t_total_ms / 1000.0)
        if result.anomalous:
            self.stats.anomalous += 1
            obs.FRAMES_ANOMALOUS.labels(cam, result.model).inc()

    def _emit_status(self, event: str) -> None:
        try:
            obs.emit_status(
                self.client,
                self.keys,
                obs.StatusEvent(
                    event=event,
                    source="worker",
                    reason=self.consumer,
                    detail={
                        "consumer": self.consumer,
                        "cameras": self.cameras,
                        "results": self.stats.results,
                    },
                ),
            )
        except redis.RedisError as exc:
            log.warning("could not write %s status event: %s", event, exc)
