"""One embedded line for the tools: a folder of frames replayed through the real pipeline.

The demo, ``bench pipeline`` and the tests all need the same thing: an embedded Redis, a config
with one replay camera and one model, and ``run_line`` until every frame is scored (capture,
workers and publisher as the same child processes ``efficientad run`` starts). ``ReplayLine``
builds that config, ``embedded_redis`` the server, ``run_until_drained`` runs it; the figures of
a run (``percentiles``) and the quiet logging around it are here too, so no tool imports another.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.core.acl import random_password
from pipeline.core.config import (
    CameraSettings,
    LineConfig,
    LoggingSettings,
    MetricsSettings,
    RedisSettings,
    RunSettings,
)
from pipeline.core.embedded_redis import EmbeddedRedis
from pipeline.core.stage_settings import PublisherSettings, WorkerSettings
from pipeline.core.wire import ResultMessage, StreamKeys
from pipeline.stages.supervisor import run_line

__all__ = [
    "LINE_LOGGERS",
    "ReplayLine",
    "embedded_redis",
    "percentiles",
    "quiet_loggers",
    "read_results",
    "run_until_drained",
    "write_line_yaml",
]

#: loggers whose INFO/WARNING lines (supervisor start lines, "no penalty images") would bury a
#: tool's own output; the tools print the same facts in plain words instead
LINE_LOGGERS = (
    "models",
    "pipeline.stages.supervisor",
    "pipeline.core.redis_conn",
    "pipeline.core.embedded_redis",
)


@dataclass
class ReplayLine:
    """A frame folder replayed through the line: one camera, one model, nothing dropped.

    ``config(url)`` is the ``LineConfig`` for a Redis at ``url``: a replay camera (every frame,
    none dropped, MAXLEN above the frame count so nothing is trimmed before it is scored), the
    model as ``default``, metrics off, WARNING logs.
    """

    frames_dir: Path
    model_dir: Path
    camera_id: str = "line1"
    fps: float = 0.0  # 0 = as fast as the workers take them (saturated)
    frames: int = 0  # frames in the folder: the stream's MAXLEN stays above it
    encoding: str = "jpeg"
    key_prefix: str = ""
    workers: int = 1
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    publisher: bool = True
    stop_timeout_s: float = 20.0
    drain_timeout_s: float = 3600.0  # a tool waits for a slow machine; no drain deadline

    def config(self, redis_url: str) -> LineConfig:
        return LineConfig(
            redis=RedisSettings(url=redis_url, key_prefix=self.key_prefix),
            cameras=[
                CameraSettings(
                    id=self.camera_id,
                    source=str(self.frames_dir),
                    fps=self.fps,
                    realtime=False,  # a replay: every frame, none dropped
                    encoding=self.encoding,  # type: ignore[arg-type]
                    maxlen=max(1000, 2 * self.frames),
                    frozen_after_s=None,
                )
            ],
            models={"default": self.model_dir},
            worker=self.worker,
            publisher=PublisherSettings(),
            metrics=MetricsSettings(enabled=False),
            logging=LoggingSettings(level="WARNING"),
            run=RunSettings(
                workers=self.workers,
                publisher=self.publisher,
                stop_timeout_s=self.stop_timeout_s,
                drain_timeout_s=self.drain_timeout_s,
            ),
        )


def embedded_redis() -> EmbeddedRedis:
    """A private redis-server (not started) with a random password for the ``default`` user."""
    return EmbeddedRedis(password=random_password())


def run_until_drained(
    config: LineConfig, *, workers: int | None = None, stop_event: threading.Event | None = None
) -> int:
    """``efficientad run --until-drained`` in this process (no signal handlers); exit code."""
    return run_line(
        config, workers=workers, until_drained=True, stop_event=stop_event, install_signals=False
    )


def read_results(client: Any, keys: StreamKeys, cam: str) -> list[ResultMessage]:
    """Every result entry of ``cam`` in stream order."""
    return [ResultMessage.from_fields(fields) for _id, fields in client.xrange(keys.results(cam))]


def write_line_yaml(path: Path, config: LineConfig) -> None:
    """A config that replays the same line with ``efficientad run`` (embedded Redis)."""
    data = config.model_dump(mode="json", exclude_defaults=True)
    data["redis"] = {"url": None}
    for section in ("logging", "metrics"):
        data.pop(section, None)
    data["run"] = {"workers": config.run.workers}
    path.write_text(
        "# written by `efficientad demo --keep`: replay the demo line with\n"
        f"#   efficientad run --config {path} --until-drained\n"
        + yaml.safe_dump(data, sort_keys=False)
    )


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max (None when there are no values) of a run's latencies."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "count": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": round(float(np.percentile(arr, 50)), 1),
        "p90": round(float(np.percentile(arr, 90)), 1),
        "p99": round(float(np.percentile(arr, 99)), 1),
        "max": round(float(arr.max()), 1),
        "count": int(arr.size),
    }


@contextlib.contextmanager
def quiet_loggers(names: Sequence[str], level: int) -> Iterator[None]:
    """Raise ``names`` to ``level`` for the duration (see ``LINE_LOGGERS``), then restore them."""
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)
