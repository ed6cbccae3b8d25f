"""The inference worker: frames:{cam} -> batches -> model -> results:{cam}, at least once, no loss.

Delivery rules (Redis Streams is at-least-once; see research/streaming.md section 4):

- One consumer group ("workers") over all configured camera streams; the consumer name is stable
  across restarts, so at start the worker re-reads its OWN pending entries (id 0) and finishes them.
- A heartbeat key (``worker.liveness``) says the worker is alive. Every ``claim_interval_s`` it
  claims the pending frames of consumers without one (dead: their frames come back within about
  ``heartbeat_ttl_ms`` + ``claim_interval_s``), and XAUTOCLAIMs entries any consumer left idle
  for longer than ``claim_min_idle_ms`` (a hung worker that still beats), its own lost ones
  included.
- A read whose reply was lost (Redis frozen past the socket timeout while the client retried)
  still delivered its frames to us: every claim interval the worker compares its pending count
  with the frames it holds and finishes the ones it never saw.
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
(at most two batches queue up behind the GPU). What becomes of each frame (triage, the result
with its overlay, the atomic write with the ack) is ``worker.results``.

Why this module is long: the delivery rules above (own pending entries first, dead and hung
consumers' frames, poison counts, retries of model failures, and the loop that orders them) act
on one consumer's state and only make sense together.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
import torch

from pipeline.core import metrics
from pipeline.core.health import HEARTBEAT
from pipeline.core.lifecycle import GracefulStop
from pipeline.core.redis_conn import (
    ensure_group,
    is_cluster,
)
from pipeline.core.stage_settings import WorkerSettings
from pipeline.core.status import StatusEvent, emit_status_quietly
from pipeline.core.wire import (
    StreamKeys,
    WireError,
    as_text,
)
from worker.batching import Background, BatchCollector
from worker.decode import decode_frames_keeping
from worker.liveness import Heartbeat, dead_consumers
from worker.results import (
    FrameEntry,
    Outcome,
    ResultWriter,
    WorkerStats,
    build_result,
    triage,
)

if TYPE_CHECKING:
    from models.inference import BatchPrediction, InferenceEngine

log = logging.getLogger(__name__)

MODEL_RETRY_DELAY_S = 1.0  # pause before re-reading a frame the model failed on
BROKEN_ENGINE_FAILURES = 3  # different frames failing in a row: the engine, not the frames


@dataclass
class _Scored:
    """A model call's output for frames that still need post-processing and publishing."""

    entries: list[FrameEntry]
    pred: BatchPrediction
    decode_s: float
    infer_s: float


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
        self._background = Background()
        self._heartbeat = Heartbeat(
            client, keys.worker_alive(self.consumer), settings.heartbeat_ttl_ms
        )
        self.stats = WorkerStats()
        self._writer = ResultWriter(client, keys, settings, self.consumer, self.stats)

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
            self._background = Background()
        try:
            while not self.stopping:
                HEARTBEAT.beat("worker")
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
                        self.recover_lost_deliveries()
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
                    metrics.REDIS_ERRORS.labels("worker").inc()
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
                entries.append(FrameEntry(cam, as_text(entry_id), fields or {}, now))
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
        key = as_text(key)
        return key[key.index("{") + 1 : key.rindex("}")]

    def recover_own_pending(self) -> int:
        """Re-read this consumer's pending entries (id 0) and finish them one at a time."""
        done = 0
        for cam in self.cameras:
            key = self.keys.frames(cam)
            cursor = "0"
            while not self.stopping:
                HEARTBEAT.beat("worker")
                reply = self.client.xreadgroup(
                    self.settings.group, self.consumer, {key: cursor}, count=1
                )
                items = reply[0][1] if reply else []
                if not items:
                    break
                entry_id, fields = items[0]
                cursor = as_text(entry_id)
                entry = FrameEntry(cam, cursor, fields or {}, time.time_ns())
                entry.deliveries = self._delivery_count(cam, cursor)
                metrics.REDELIVERIES.labels(cam).inc()
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
                ids = [as_text(r["message_id"]) for r in rows]
                if not ids:
                    continue
                entries = self.client.xclaim(key, group, self.consumer, min_idle, ids)
                got = {as_text(e): f for e, f in entries if e is not None}
                # Redis 6.2 returns trimmed entries without fields; Redis 7 drops them from the
                # PEL silently (nothing left to score, and the publisher's gap closes at once)
                vanished = [i for i in ids if i in got and not got[i]]
                if vanished:
                    self._writer.record_vanished(cam, vanished)
                log.warning(
                    "claiming the frames of a dead worker",
                    extra={"camera": cam, "dead": dead, "count": len(got)},
                )
                for entry_id, fields in got.items():
                    if not fields:
                        continue
                    entry = FrameEntry(cam, entry_id, fields, time.time_ns())
                    entry.deliveries = self._delivery_count(cam, entry_id)
                    metrics.REDELIVERIES.labels(cam).inc()
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
                cursor, items = as_text(reply[0]), reply[1]
                deleted = reply[2] if len(reply) > 2 else []
                self._claim_cursor[cam] = cursor
                if deleted:
                    self._writer.record_vanished(cam, [as_text(d) for d in deleted])
                for entry_id, fields in items:
                    entry = FrameEntry(cam, as_text(entry_id), fields or {}, time.time_ns())
                    entry.deliveries = self._delivery_count(cam, entry.entry_id)
                    metrics.REDELIVERIES.labels(cam).inc()
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

    def recover_lost_deliveries(self) -> int:
        """Finish frames pending to this consumer that it does not hold.

        A read whose reply never arrived still delivered its entries: when Redis froze past the
        socket timeout, the client's retry reads the next entries while the server also ran the
        first read. Those frames sit in our pending list, unseen, until something claims them;
        the publisher meanwhile waits for them. Comparing our pending count with what we hold
        finds them within one claim interval.
        """
        self._background.drain()  # nothing in flight: what we hold is in the collectors
        held: dict[str, set[str]] = defaultdict(set)
        for collector in self._collectors.values():
            for entry in collector.items():
                held[entry.cam].add(entry.entry_id)
        recovered = 0
        for cam in self.cameras:
            key, group = self.keys.frames(cam), self.settings.group
            summary = self.client.xpending(key, group)
            mine = sum(
                int(c["pending"])
                for c in summary.get("consumers") or []
                if as_text(c["name"]) == self.consumer
            )
            if mine <= len(held[cam]):
                continue
            rows = self.client.xpending_range(
                key, group, "-", "+", mine, consumername=self.consumer
            )
            lost = [i for i in (as_text(r["message_id"]) for r in rows) if i not in held[cam]]
            if not lost:
                continue
            log.warning(
                "frames delivered to this worker were never seen (a lost read reply); "
                "finishing them now",
                extra={"camera": cam, "count": len(lost)},
            )
            for entry_id, fields in self.client.xclaim(key, group, self.consumer, 0, lost):
                if entry_id is None:
                    continue
                entry = FrameEntry(cam, as_text(entry_id), fields or {}, time.time_ns())
                entry.deliveries = self._delivery_count(cam, entry.entry_id)
                metrics.REDELIVERIES.labels(cam).inc()
                self.stats.recovered += 1
                recovered += 1
                self._process_batch(self.engines[cam], [entry])
                self._background.drain()
        return recovered

    def _delivery_count(self, cam: str, entry_id: str) -> int:
        rows = self.client.xpending_range(
            self.keys.frames(cam), self.settings.group, min=entry_id, max=entry_id, count=1
        )
        return int(rows[0]["times_delivered"]) if rows else 1

    def _update_pending_gauges(self) -> None:
        for cam in self.cameras:
            summary = self.client.xpending(self.keys.frames(cam), self.settings.group)
            metrics.PENDING_ENTRIES.labels(cam, self.settings.group).set(int(summary["pending"]))

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
        outcomes: list[Outcome] = []
        usable: list[FrameEntry] = []
        for entry in entries:
            rejected = triage(entry, self.settings)
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

    def _score(
        self, engine: InferenceEngine, entries: list[FrameEntry]
    ) -> tuple[list[Outcome], list[_Scored]]:
        """Decode and run the model (GPU side); frames that do not decode become dead letters."""
        model = engine.info.name
        frames = [e.frame for e in entries if e.frame is not None]
        t0 = time.perf_counter()
        keep = self.settings.overlay_max_side if self.settings.overlays else None
        decoded, previews = decode_frames_keeping(
            frames, engine.device, engine.info.image_size, self.settings.max_frame_pixels, keep
        )
        decode_s = time.perf_counter() - t0
        metrics.DECODE_LATENCY.labels(model).observe(decode_s)
        rejected: list[Outcome] = []
        by_shape: dict[tuple[int, ...], list[tuple[FrameEntry, torch.Tensor]]] = defaultdict(list)
        for entry, image, preview in zip(entries, decoded, previews, strict=True):
            entry.preview = preview  # until its result is built: the overlay is drawn from it
            if isinstance(image, WireError):
                rejected.append(Outcome(entry, reason="undecodable", detail=str(image)))
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
        metrics.BATCHES.labels(model).inc()
        metrics.BATCH_SIZE.labels(model).observe(len(group))
        metrics.INFER_LATENCY.labels(model).observe(infer_s)
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
        self, engine: InferenceEngine, rejected: list[Outcome], scored: list[_Scored]
    ) -> None:
        """CPU side, off the GPU thread: maps -> regions/PNGs -> results, then publish + ack."""
        outcomes = list(rejected)
        for batch in scored:
            for i, entry in enumerate(batch.entries):
                result = build_result(
                    entry,
                    engine.info,
                    batch.pred,
                    i,
                    self.settings,
                    self.consumer,
                    batch=len(batch.entries),
                    decode_s=batch.decode_s,
                    infer_s=batch.infer_s,
                )
                outcomes.append(Outcome(entry, result=result))
        self._writer.publish(outcomes)

    def _emit_status(self, event: str) -> None:
        detail = {"consumer": self.consumer, "cameras": self.cameras, "results": self.stats.results}
        status = StatusEvent(event=event, source="worker", reason=self.consumer, detail=detail)
        emit_status_quietly(self.client, self.keys, status, log)
