"""Worker liveness: a heartbeat key per consumer, so peers reclaim a dead worker's frames at once.

Idle time alone cannot tell a dead worker from a slow one, so XAUTOCLAIM has to wait longer than
the slowest batch (``claim_min_idle_ms``, 30 s by default) - far too long for a publisher that
holds newer results back until the dead worker's frames are scored. Each worker therefore renews
``worker:<consumer>:alive`` (SET PX ``heartbeat_ttl_ms``) from a thread of its own; a consumer of
the group that has pending frames but no such key is dead, and its frames are claimed as soon as
they have been idle ``dead_claim_min_idle_ms``. Claiming is safe even when the judgement is wrong
(a worker whose renewals were delayed): the result script writes a result only for a frame that
is still pending and acks it in the same step, so whichever copy finishes first wins and the other
writes nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from pipeline.core.redis_conn import is_permission_error
from pipeline.core.wire import as_text

log = logging.getLogger(__name__)


class Heartbeat:
    """Keeps ``key`` alive while the worker runs; deleted on a clean stop."""

    def __init__(self, client: redis.Redis, key: str, ttl_ms: int) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Beat once now (so the key exists before the first read), then in the background."""
        self._beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.client.delete(self.key)
        except redis.RedisError as exc:  # it expires by itself
            log.debug("could not delete the heartbeat key: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000.0):
            self._beat()

    def _beat(self) -> None:
        try:
            self.client.set(self.key, b"1", px=self.ttl_ms)
        except redis.RedisError as exc:  # Redis down: the main loop reports it; keep trying
            if is_permission_error(exc) and self._thread is None:
                raise  # the first beat, from start(): a wrong ACL must fail loudly
            log.debug("heartbeat failed: %s", exc)


def dead_consumers(
    client: redis.Redis, stream: str, group: str, alive_key: Callable[[str], str], me: str
) -> list[str]:
    """Consumers of ``group`` on ``stream`` holding frames without a live heartbeat key.

    ``alive_key`` maps a consumer name to its heartbeat key (``StreamKeys.worker_alive``).
    """
    try:
        consumers = client.xinfo_consumers(stream, group)
    except redis.ResponseError as exc:
        if is_permission_error(exc):
            raise
        return []  # no stream or group yet
    holders = [
        as_text(c["name"])
        for c in consumers
        if int(c.get("pending", 0)) > 0 and as_text(c["name"]) != me
    ]
    if not holders:
        return []
    pipe = client.pipeline(transaction=False)
    for name in holders:
        pipe.exists(alive_key(name))
    return [name for name, alive in zip(holders, pipe.execute(), strict=True) if not alive]
