"""Metrics, health endpoints, structured logs and status events shared by every process.

Each process (capture, worker, publisher) serves ``/metrics`` (Prometheus text format),
``/healthz`` (alive: the HTTP thread answers and, where the process has a main loop, that loop still
turns; see ``Heartbeat``) and ``/readyz`` (Redis reachable and the process ready for work) on one
port. Metric objects live here so every stage uses the same names
(``efficientad_*``) and labels; a process only exports the series it touched.

Status events (camera online/offline/frozen, capture stats, process start/stop) go to the
``status`` stream as flat entries, see ``StatusEvent``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from pydantic import Field

from pipeline.wire import StreamKeys, WireModel

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from pipeline.config import MetricsSettings

__all__ = [
    "ALARMS",
    "ALARM_ACTIVE",
    "APPLY_FAILURES",
    "BATCHES",
    "BATCH_SIZE",
    "CAMERA_EVENTS",
    "CAMERA_ONLINE",
    "CAPTURE_BUFFER",
    "DEAD_LETTERS",
    "DECODE_LATENCY",
    "DUPLICATES",
    "END_TO_END_LATENCY",
    "FRAMES_ANOMALOUS",
    "FRAMES_CAPTURED",
    "FRAMES_DROPPED",
    "FRAMES_SCORED",
    "FRAMES_WRITTEN",
    "GAPS_GIVEN_UP",
    "HEARTBEAT",
    "INFER_LATENCY",
    "LATE_RESULTS",
    "PENDING_ENTRIES",
    "PROCESS_RESTARTS",
    "PUBLISHER_HOLD",
    "QUEUE_WAIT",
    "REDELIVERIES",
    "REDIS_ERRORS",
    "STATUS_MAXLEN",
    "Heartbeat",
    "JsonFormatter",
    "MetricsServer",
    "StatusEvent",
    "emit_status",
    "redis_ready_check",
    "setup_logging",
    "start_metrics_server",
]

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


# ------------------------------------------------------------------------------------------------
# liveness of main loops


class Heartbeat:
    """When each main loop of this process last turned, so /healthz can report a stuck one.

    A thread that only answers HTTP proves nothing about the loop doing the work: a deadlock or a
    socket read without timeout leaves /healthz green while frames pile up. Each loop calls
    ``beat(name)`` once per iteration (cheap: one lock, one dict store) and ``done(name)`` when it
    ends on purpose (a finished replay camera). /healthz answers 503 when any loop's last beat is
    older than its limit: ``max(min_limit_s, limit_s given to beat)`` (30 s by default), and, once
    ``arm()`` was called (by ``start_metrics_server``), when no loop beat at all within
    ``grace_s`` of that (model loading, first connection).
    """

    def __init__(
        self,
        *,
        min_limit_s: float = 30.0,
        grace_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_limit_s = min_limit_s
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._loops: dict[str, tuple[float, float]] = {}  # name -> (last beat, limit)
        self._armed_at: float | None = None
        self._seen = False

    def arm(self) -> None:
        """Start the grace period: from now on, no beat at all is unhealthy after ``grace_s``."""
        with self._lock:
            self._armed_at = self._clock()

    def beat(self, name: str = "main", limit_s: float | None = None) -> None:
        """Loop ``name`` is alive; ``limit_s``: its longest legitimate iteration (floor 30 s)."""
        limit = max(self.min_limit_s, limit_s or 0.0)
        now = self._clock()
        with self._lock:
            self._loops[name] = (now, limit)
            self._seen = True

    def done(self, name: str = "main") -> None:
        """Loop ``name`` ended on purpose: stop watching it."""
        with self._lock:
            self._loops.pop(name, None)

    def reset(self) -> None:
        """Forget every loop and the grace period (tests, re-used processes)."""
        with self._lock:
            self._loops.clear()
            self._armed_at = None
            self._seen = False

    def ages(self) -> dict[str, float]:
        """Seconds since each watched loop's last beat."""
        now = self._clock()
        with self._lock:
            return {name: now - at for name, (at, _) in self._loops.items()}

    def check(self) -> tuple[bool, str]:
        """(healthy, one-line reason with the heartbeat ages) for /healthz."""
        now = self._clock()
        with self._lock:
            loops = dict(self._loops)
            armed_at, seen = self._armed_at, self._seen
        if not seen:
            if armed_at is None:
                return True, "ok"
            waited = now - armed_at
            if waited <= self.grace_s:
                return True, f"ok: starting, no heartbeat yet ({waited:.1f} s)"
            return False, (
                f"stuck: main loop never started: no heartbeat {waited:.1f} s after start "
                f"(grace {self.grace_s:.0f} s)"
            )
        stuck = [
            f"{name} last beat {now - at:.1f} s ago (limit {limit:.0f} s)"
            for name, (at, limit) in sorted(loops.items())
            if now - at > limit
        ]
        if stuck:
            return False, "stuck: " + "; ".join(stuck)
        if not loops:
            return True, "ok: all loops finished"
        ages = ", ".join(f"{name} {now - at:.1f} s" for name, (at, _) in sorted(loops.items()))
        return True, f"ok: heartbeat age {ages}"


HEARTBEAT = Heartbeat()  # the process's main loops beat here; /healthz reads it


# ------------------------------------------------------------------------------------------------
# HTTP: /metrics, /healthz, /readyz


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logging.getLogger("efficientad.http").debug(format, *args)


class MetricsServer:
    """The running HTTP server; ``close()`` stops it (tests, clean shutdown)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _health_app(
    ready_check: Callable[[], bool] | None,
    registry: CollectorRegistry,
    heartbeat: Heartbeat | None,
) -> Callable[[WSGIEnvironment, StartResponse], list[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            if heartbeat is None:
                return _text(start_response, "200 OK", "ok\n")
            healthy, reason = heartbeat.check()
            status = "200 OK" if healthy else "503 Service Unavailable"
            return _text(start_response, status, reason + "\n")
        if path == "/readyz":
            try:
                ready = bool(ready_check()) if ready_check is not None else True
                reason = "" if ready else "not ready"
            except Exception as exc:  # a failing probe means "not ready", never a 500 loop
                ready, reason = False, f"{type(exc).__name__}: {exc}"
            if ready:
                return _text(start_response, "200 OK", "ready\n")
            return _text(start_response, "503 Service Unavailable", f"{reason}\n")
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        return _text(start_response, "404 Not Found", "try /metrics, /healthz, /readyz\n")

    return app


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]
    )
    return [data]


def start_metrics_server(
    settings: MetricsSettings,
    ready_check: Callable[[], bool] | None = None,
    *,
    registry: CollectorRegistry = REGISTRY,
    heartbeat: Heartbeat | None = None,
) -> MetricsServer | None:
    """Serve /metrics, /healthz and /readyz in a daemon thread; ``None`` when disabled.

    ``ready_check`` returns True when the process can do its job (Redis reachable, model loaded);
    it runs on every /readyz request, so keep it cheap (see ``redis_ready_check``).
    ``heartbeat`` (a process with a main loop passes ``HEARTBEAT``) makes /healthz report a stuck
    loop with 503; it is armed here, so its start grace period begins now.
    """
    if not settings.enabled:
        return None
    try:
        server = make_server(
            settings.host,
            settings.port,
            _health_app(ready_check, registry, heartbeat),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"metrics endpoint cannot listen on {settings.host}:{settings.port}: {exc.strerror} "
            "(choose another metrics.port / --metrics-port, 0 = any free port, or --no-metrics)",
        ) from None
    if heartbeat is not None:
        heartbeat.arm()
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    result = MetricsServer(server, thread)
    logging.getLogger(__name__).info(
        "metrics and health endpoints up", extra={"url": result.url, "port": result.port}
    )
    return result


def redis_ready_check(
    client: redis.Redis,
    also: Callable[[], bool] | None = None,
    *,
    cache_s: float = 1.0,
) -> Callable[[], bool]:
    """A readiness probe: Redis answers PING (cached ``cache_s``) and ``also()`` is true."""
    state: dict[str, float | bool] = {"at": 0.0, "ok": False}
    lock = threading.Lock()

    def check() -> bool:
        with lock:
            now = time.monotonic()
            if now - float(state["at"]) > cache_s:
                try:
                    state["ok"] = bool(client.ping())
                except redis.RedisError:
                    state["ok"] = False
                state["at"] = now
            ok = bool(state["ok"])
        return ok and (also() if also is not None else True)

    return check


# ------------------------------------------------------------------------------------------------
# logging

_RECORD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)
PROCESS_NAME_ENV = "EFFICIENTAD_PROCESS_NAME"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, proc, then every ``extra=`` field."""

    def __init__(self, process_name: str | None = None) -> None:
        super().__init__()
        self.process_name = process_name

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.process_name:
            out["proc"] = self.process_name
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """Readable lines that still show the ``extra=`` fields as key=value."""

    def __init__(self, process_name: str | None) -> None:
        prefix = f"[{process_name}] " if process_name else ""
        super().__init__(f"%(asctime)s %(levelname)-7s {prefix}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_")
        ]
        if not extras:
            return text
        head, sep, tail = text.partition("\n")
        return f"{head} {' '.join(extras)}{sep}{tail}"


def setup_logging(
    level: str = "INFO", json_logs: bool = False, process_name: str | None = None
) -> None:
    """Configure the root logger once per process (stderr; JSON lines when ``json_logs``).

    ``process_name`` (default: ``$EFFICIENTAD_PROCESS_NAME``, set by ``efficientad run``) is added
    to every record so interleaved child logs stay attributable.
    """
    name = process_name or os.environ.get(PROCESS_NAME_ENV)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(name) if json_logs else _TextFormatter(name))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------
# status stream

STATUS_MAXLEN = 100_000
StatusEventType = Literal[
    "camera.online",
    "camera.offline",
    "camera.frozen",
    "camera.unfrozen",
    "camera.finished",
    "camera.error",
    "capture.stats",
    "process.started",
    "process.stopped",
    "process.exited",
    "process.restarting",
    "publisher.late_result",
    "publisher.gap_given_up",
    "publisher.apply_failed",
    "publisher.state_reset",
]


class StatusEvent(WireModel):
    """An entry of the ``status`` stream.

    - ``event`` one of ``StatusEventType``; ``ts_ns`` when it happened
    - ``source`` the process that wrote it (``capture``, ``run``, ...), ``host``, ``pid``
    - ``cam`` camera id (camera events and capture stats), empty otherwise
    - ``reason`` short human text (why offline, exit code, ...)
    - ``detail`` JSON object with counters (frames read/written/dropped, restarts, ...)
    """

    JSON_FIELDS: ClassVar[frozenset[str]] = frozenset({"detail"})

    event: StatusEventType
    ts_ns: int = Field(default_factory=time.time_ns)
    source: str = ""
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    cam: str = ""
    reason: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)


def emit_status(
    client: redis.Redis | redis.client.Pipeline,
    keys: StreamKeys,
    event: StatusEvent,
    *,
    maxlen: int = STATUS_MAXLEN,
) -> Any:
    """XADD ``event`` to the status stream (approximate MAXLEN); returns the entry id."""
    return client.xadd(keys.status(), event.to_fields(), maxlen=maxlen, approximate=True)
