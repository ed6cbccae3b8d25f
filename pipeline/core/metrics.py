"""Prometheus metric objects shared by every process of the line.

They live in one module so every stage uses the same names (``efficientad_*``) and labels; a
process only exports the series it touched. Served by ``pipeline.core.health``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # the *_created series only add noise to every scrape

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# ---- capture
FRAMES_CAPTURED = Counter(
    "efficientad_frames_captured_total", "Frames read from the source", ["camera"]
)
FRAMES_WRITTEN = Counter(
    "efficientad_frames_written_total", "Frames added to frames:{cam} in Redis", ["camera"]
)
FRAMES_DROPPED = Counter(
    "efficientad_frames_dropped_total",
    "Frames that never reached a model: buffer_full (Redis slow/down), unreadable (source file), "
    "too_old / trimmed (worker side)",
    ["camera", "reason"],
)
CAPTURE_BUFFER = Gauge(
    "efficientad_capture_buffer_frames", "Encoded frames waiting for Redis", ["camera"]
)
CAMERA_ONLINE = Gauge("efficientad_camera_online", "1 while the source delivers frames", ["camera"])
CAMERA_EVENTS = Counter(
    "efficientad_camera_events_total",
    "Camera supervision events (online, offline, frozen, unfrozen, reconnect, finished)",
    ["camera", "event"],
)

# ---- worker
BATCHES = Counter("efficientad_batches_total", "Model calls", ["model"])
BATCH_SIZE = Histogram(
    "efficientad_batch_size", "Frames per model call", ["model"], buckets=BATCH_BUCKETS
)
QUEUE_WAIT = Histogram(
    "efficientad_queue_wait_seconds",
    "Capture time to the worker reading the frame",
    ["camera"],
    buckets=LATENCY_BUCKETS,
)
DECODE_LATENCY = Histogram(
    "efficientad_decode_seconds", "Decoding one batch of frames", ["model"], buckets=LATENCY_BUCKETS
)
INFER_LATENCY = Histogram(
    "efficientad_infer_seconds", "One model call (batch)", ["model"], buckets=LATENCY_BUCKETS
)
END_TO_END_LATENCY = Histogram(
    "efficientad_end_to_end_seconds",
    "Capture time to the result being written (stage=worker) or its alarm event (stage=publisher)",
    ["camera", "stage"],
    buckets=LATENCY_BUCKETS,
)
FRAMES_SCORED = Counter(
    "efficientad_frames_scored_total", "Frames with a result", ["camera", "model"]
)
FRAMES_ANOMALOUS = Counter(
    "efficientad_frames_anomalous_total", "Frames scored anomalous", ["camera", "model"]
)
PENDING_ENTRIES = Gauge(
    "efficientad_pending_entries",
    "Entries delivered but not acknowledged (XPENDING) per stream and group",
    ["camera", "group"],
)
REDELIVERIES = Counter(
    "efficientad_redeliveries_total",
    "Entries read again: own pending history at start or claimed from a dead consumer",
    ["camera"],
)
DEAD_LETTERS = Counter(
    "efficientad_dead_letters_total", "Entries moved to deadletter:{cam}", ["camera", "reason"]
)

# ---- publisher
ALARMS = Counter(
    "efficientad_alarms_total",
    "Alarm events emitted (event = started | updated | ended)",
    ["camera", "event"],
)
ALARM_ACTIVE = Gauge("efficientad_alarm_active", "1 while an alarm episode is open", ["camera"])
DUPLICATES = Counter(
    "efficientad_duplicate_results_total",
    "Results ignored as duplicates (same frame id, or a seq already applied)",
    ["camera"],
)
LATE_RESULTS = Counter(
    "efficientad_late_results_total",
    "Results that arrived after the publisher gave up waiting for their frame (not applied)",
    ["camera"],
)
GAPS_GIVEN_UP = Counter(
    "efficientad_gaps_given_up_total",
    "Times newer results were applied without an older frame a worker still held",
    ["camera"],
)
PUBLISHER_HOLD = Histogram(
    "efficientad_publisher_hold_seconds",
    "Time a result waited in the publisher for older frames before it was applied",
    ["camera"],
    buckets=LATENCY_BUCKETS,
)
APPLY_FAILURES = Counter(
    "efficientad_apply_failures_total",
    "Results whose alarm processing raised (retried, then dead-lettered)",
    ["camera"],
)

# ---- every process
REDIS_ERRORS = Counter(
    "efficientad_redis_errors_total", "Redis connection/timeout errors", ["component"]
)
PROCESS_RESTARTS = Counter(
    "efficientad_process_restarts_total", "Child processes restarted by `run`", ["process"]
)
