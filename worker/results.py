"""What becomes of each frame a worker read: a result or a dead letter, written with its ack.

- ``triage`` rejects what must not reach the model (trimmed, poison, oversize, malformed, too
  old, undecodable by its header) before any decoder runs.
- ``build_result`` turns one frame's model output into its ``ResultMessage``: regions, mask and
  heat map, and for an anomalous frame the overlay, drawn here because the decoded frame is still
  in memory (the publisher never reads frames back).
- ``ResultWriter`` writes each frame's result (or dead letter) and XACKs it in one atomic script
  call per camera and batch: the script adds an entry only for a frame still pending in the group
  and acks a frame only after its entry exists, so a slow worker whose frame a peer finished adds
  no second result, and no frame is acked without a record of what became of it.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import redis

from pipeline.core import metrics
from pipeline.core.heatmap import fit_longest_side, render_overlay
from pipeline.core.image_codec import ImageTooLargeError, check_frame, decode_image
from pipeline.core.redis_conn import RedisPermissionError, is_permission_error
from pipeline.core.stage_settings import WorkerSettings
from pipeline.core.wire import (
    FieldMap,
    FrameMessage,
    Region,
    ResultMessage,
    StreamKeys,
    WireError,
    as_text,
    deadletter_fields,
)
from worker.postprocess import postprocess

if TYPE_CHECKING:
    from models.inference import BatchPrediction, ModelInfo

__all__ = [
    "PUBLISH_SCRIPT",
    "FrameEntry",
    "Outcome",
    "ResultWriter",
    "WorkerStats",
    "build_result",
    "triage",
]

log = logging.getLogger(__name__)

MAX_DEADLETTER_FIELDS = 256  # original fields copied into a dead letter

# KEYS: frames, results, deadletter of one camera (one hash tag: one Cluster slot).
# ARGV: group, results MAXLEN, deadletter MAXLEN, then per frame: entry id, "r" (result) or "d"
# (dead letter), field count, fields... Per frame it returns the new entry id, 0 when the frame is
# no longer pending (a peer finished it), or "!<error>" when the XADD failed (frame left pending).
# A script runs atomically, so no reader ever sees a second entry for a frame, and a frame is only
# acked after its entry exists.
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


@dataclass
class FrameEntry:
    """A frame entry read from Redis and owned by this consumer until it is acked.

    ``preview`` is the decoded frame (BGR uint8, longest side <= ``overlay_max_side``), kept
    from decoding until its result is built so an anomalous frame's overlay needs no second
    decode; ``None`` on the CUDA nvJPEG path (see ``build_result``).
    """

    cam: str
    entry_id: str
    fields: dict[bytes, bytes]
    read_ns: int
    deliveries: int = 1
    frame: FrameMessage | None = None
    preview: np.ndarray | None = None


@dataclass
class Outcome:
    """What one frame entry turns into: a result or a dead letter (plus the ack either way)."""

    entry: FrameEntry
    result: ResultMessage | None = None
    reason: str | None = None
    detail: str = ""


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


# ------------------------------------------------------------------------------- before the model


def triage(entry: FrameEntry, settings: WorkerSettings) -> Outcome | None:
    """A dead-letter outcome for what must not reach the model; else parse it (``entry.frame``)."""
    cam = entry.cam
    if not entry.fields:
        return Outcome(entry, reason="trimmed", detail="entry body is gone from the stream")
    if entry.deliveries > settings.max_deliveries:
        return Outcome(
            entry,
            reason="poison",
            detail=f"delivered {entry.deliveries} times (limit {settings.max_deliveries})",
        )
    size = len(entry.fields.get(b"data", b""))
    if size > settings.max_frame_bytes:
        return Outcome(
            entry,
            reason="oversize",
            detail=f"data is {size} bytes, max_frame_bytes={settings.max_frame_bytes}",
        )
    try:
        frame = FrameMessage.from_fields(entry.fields)
    except WireError as exc:
        return Outcome(entry, reason="malformed", detail=str(exc))
    if frame.cam != cam:
        return Outcome(
            entry, reason="malformed", detail=f"cam field {frame.cam!r} in stream of {cam!r}"
        )
    if settings.max_age_s is not None:
        age_s = (entry.read_ns - frame.ts_ns) / 1e9
        if age_s > settings.max_age_s:
            return Outcome(
                entry,
                reason="too_old",
                detail=f"captured {age_s:.3f} s ago, max_age_s={settings.max_age_s}",
            )
    try:  # header only: no decoder ever allocates for a size nobody checked
        check_frame(frame, max_pixels=settings.max_frame_pixels)
    except ImageTooLargeError as exc:
        return Outcome(entry, reason="oversize", detail=str(exc))
    except WireError as exc:  # enc names the other format (malformed), or bad bytes/size
        reason = "malformed" if exc.field == "enc" else "undecodable"
        return Outcome(entry, reason=reason, detail=str(exc))
    entry.frame = frame
    return None


# ------------------------------------------------------------------------------- after the model


def build_result(
    entry: FrameEntry,
    info: ModelInfo,
    pred: BatchPrediction,
    index: int,
    settings: WorkerSettings,
    consumer: str,
    *,
    batch: int,
    decode_s: float,
    infer_s: float,
) -> ResultMessage:
    """The result of frame ``index`` of a model call: score, regions, PNGs, overlay."""
    frame = entry.frame
    assert frame is not None
    anomalous = bool(pred.anomalous[index])
    images = anomalous or settings.mask_for_normal
    post = postprocess(
        pred.maps[index],
        info.threshold,
        frame_size=(frame.h, frame.w) if settings.map_resolution == "frame" else None,
        with_images=images,
        find=images,
    )
    overlay = None
    if anomalous and settings.overlays and post.levels is not None:
        overlay = _overlay(entry, post.levels, post.regions, (post.map_h, post.map_w), settings)
    entry.preview = None  # the frame's pixels are no longer needed
    return ResultMessage(
        cam=entry.cam,
        frame_id=entry.entry_id,
        seq=frame.seq,
        ts_ns=frame.ts_ns,
        score=float(pred.scores[index]),
        score_norm=float(np.clip(pred.normalized[index], 0.0, 1.0)),
        anomalous=anomalous,
        threshold=float(info.threshold),
        model=info.name,
        model_version=info.version,
        model_sha256=info.sha256,
        t_queue_ms=max(0.0, (entry.read_ns - frame.ts_ns) / 1e6),
        t_decode_ms=decode_s * 1000.0,
        t_infer_ms=infer_s * 1000.0,
        frame_w=frame.w,
        frame_h=frame.h,
        map_w=post.map_w,
        map_h=post.map_h,
        regions=post.regions,
        mask=post.mask_png,
        heatmap=post.heatmap_png,
        overlay=overlay,
        batch=batch,
        worker=consumer,
    )


def _overlay(
    entry: FrameEntry,
    levels: np.ndarray,
    regions: list[Region],
    map_size: tuple[int, int],
    settings: WorkerSettings,
) -> bytes | None:
    """The overlay JPEG of an anomalous frame; None (logged) if it cannot be drawn: a picture
    must never cost a frame its result."""
    frame = entry.frame
    assert frame is not None
    try:
        preview = entry.preview
        if preview is None:
            # The CUDA path decodes JPEGs with nvJPEG into GPU memory and keeps no host copy:
            # copying every frame back would cost PCIe bandwidth and host memory for the few
            # anomalous ones, so those few are decoded again here, on the CPU.
            preview = fit_longest_side(
                decode_image(frame, max_pixels=settings.max_frame_pixels),
                settings.overlay_max_side,
            )
        return render_overlay(preview, levels, regions, map_size, settings.overlay_quality)
    except (WireError, cv2.error, ValueError, MemoryError) as exc:
        log.warning(
            "overlay could not be drawn: %s", exc, extra={"camera": entry.cam, "seq": frame.seq}
        )
        return None


# ------------------------------------------------------------------------------- writing


class ResultWriter:
    """Writes outcomes (results and dead letters) with their acks, and counts them."""

    def __init__(
        self,
        client: redis.Redis,
        keys: StreamKeys,
        settings: WorkerSettings,
        consumer: str,
        stats: WorkerStats,
    ) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self.consumer = consumer
        self.stats = stats
        self._script = client.register_script(PUBLISH_SCRIPT)

    def publish(self, outcomes: Iterable[Outcome]) -> None:
        by_cam: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            by_cam[outcome.entry.cam].append(outcome)
        for cam, items in by_cam.items():
            items.sort(key=lambda o: o.result.seq if o.result else -1)
            self._publish_camera(cam, items)

    def _publish_camera(self, cam: str, outcomes: list[Outcome]) -> None:
        """Write each frame's result (or dead letter) and XACK it in one atomic script call."""
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
        failed: list[tuple[Outcome, str]] = []
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

    def _entry_fields(self, outcome: Outcome) -> FieldMap:
        if outcome.result is not None:
            return outcome.result.to_fields()
        return self._deadletter_fields(outcome)

    def _publish_atomically(
        self, cam: str, items: list[tuple[Outcome, FieldMap]]
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
        replies = self._script(keys=keys, args=args)
        if any(isinstance(r, bytes | str) and is_permission_error(r) for r in replies):
            raise RedisPermissionError(f"the result script was denied by the ACL: {replies}")
        return [None if reply == 0 else as_text(reply) for reply in replies]

    def _rescue(self, cam: str, failed: list[tuple[Outcome, str]]) -> None:
        """A result could not be written (its frame is still pending): dead-letter the frame."""
        rescues = []
        for outcome, error in failed:
            log.error(
                "result could not be written; dead-lettering the frame",
                extra={"camera": cam, "entry": outcome.entry.entry_id, "error": error},
            )
            dead = Outcome(outcome.entry, reason="publish_failed", detail=error)
            rescues.append((dead, self._deadletter_fields(dead)))
        for (dead, _), reply in zip(rescues, self._publish_atomically(cam, rescues), strict=True):
            if reply is not None and reply.startswith("!"):
                # neither a result nor a dead letter can be written: the frame stays pending and
                # is retried once claim_min_idle_ms passes (its delivery count keeps growing)
                metrics.REDIS_ERRORS.labels("worker").inc()
                log.error(
                    "frame kept pending: its dead letter could not be written either",
                    extra={"camera": cam, "entry": dead.entry.entry_id, "error": reply[1:]},
                )
            elif reply is not None:
                self._count(dead)

    def _deadletter_fields(self, outcome: Outcome) -> FieldMap:
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

    def record_vanished(self, cam: str, entry_ids: list[str]) -> None:
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
        metrics.DEAD_LETTERS.labels(cam, "trimmed").inc(len(entry_ids))
        metrics.FRAMES_DROPPED.labels(cam, "trimmed").inc(len(entry_ids))
        self.stats.dead_letters["trimmed"] += len(entry_ids)

    def _count(self, outcome: Outcome) -> None:
        cam = outcome.entry.cam
        result = outcome.result
        if result is None:
            reason = outcome.reason or "malformed"
            self.stats.dead_letters[reason] += 1
            metrics.DEAD_LETTERS.labels(cam, reason).inc()
            if reason in ("too_old", "trimmed"):
                metrics.FRAMES_DROPPED.labels(cam, reason).inc()
            log.warning(
                "frame dead-lettered",
                extra={"camera": cam, "entry": outcome.entry.entry_id, "reason": reason},
            )
            return
        self.stats.results += 1
        metrics.FRAMES_SCORED.labels(cam, result.model).inc()
        metrics.QUEUE_WAIT.labels(cam).observe(result.t_queue_ms / 1000.0)
        metrics.END_TO_END_LATENCY.labels(cam, "worker").observe(result.t_total_ms / 1000.0)
        if result.anomalous:
            self.stats.anomalous += 1
            metrics.FRAMES_ANOMALOUS.labels(cam, result.model).inc()
