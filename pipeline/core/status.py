"""Status events: camera online/offline/frozen, capture stats, process start/stop, publisher
notices, as flat entries of the ``status`` stream (``StatusEvent``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, ClassVar, Literal

import redis
from pydantic import Field

from pipeline.core.wire import StreamKeys, WireModel

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


def emit_status_quietly(
    client: redis.Redis,
    keys: StreamKeys,
    event: StatusEvent,
    log: logging.Logger,
    level: int = logging.WARNING,
) -> None:
    """``emit_status`` where a status event is best effort (process start/stop): a Redis error
    is logged at ``level``, never raised, so it cannot stop the work the event reports on."""
    try:
        emit_status(client, keys, event)
    except redis.RedisError as exc:
        log.log(level, "could not write %s status event: %s", event.event, exc)
