"""Health endpoints: ``/metrics``, ``/healthz`` and ``/readyz`` on one port per process.

``/healthz`` means alive: the HTTP thread answers and, where the process has a main loop, that
loop still turns (``Heartbeat``); ``/readyz`` means Redis is reachable and the process is ready for
work. A green ``/healthz`` from a thread that only answers HTTP would prove nothing about the loop
doing the work, hence the heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

    from pipeline.core.config import MetricsSettings

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
