"""``efficientad capture``: the configured cameras (or one ``--source``) into ``frames:{cam}``.

Exit codes: 0 done or stopped by a signal, 1 runtime failure, 2 bad configuration or a source
that can never work (missing file, ROI outside the frame, old Redis, a Redis user without the
capture role's permissions): ``efficientad run`` does not restart such a child.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from typing import Any

from efficientad.cli_support import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    add_config_arguments,
    connect_redis,
    fail,
    load_command_config,
    roi,
    serve_stage,
    stop_on_signals,
)
from pipeline.core.config import CameraSettings, ConfigError, LineConfig
from pipeline.core.redis_conn import redact_url
from pipeline.core.status import StatusEvent, emit_status_quietly

__all__ = ["cmd_capture", "register"]

log = logging.getLogger("efficientad.capture")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``capture`` to the ``efficientad`` CLI."""
    cap = add_command(
        sub,
        "capture",
        cmd_capture,
        help="read cameras/files/folders and stream frames into Redis",
        description=(
            "Capture the configured cameras (or one --source) into frames:{cam}. Replays of files "
            "and folders exit when done; live cameras run until SIGINT/SIGTERM."
        ),
    )
    add_config_arguments(cap)
    cap.add_argument(
        "--camera", action="append", default=[], metavar="ID", help="only these camera ids"
    )
    one = cap.add_argument_group("ad-hoc camera (instead of the config's cameras:)")
    one.add_argument("--source", help="video file, image folder, rtsp://... URL, or usb:N")
    one.add_argument("--id", default="cam0", help="camera id for --source (default cam0)")
    tune = cap.add_argument_group("per-camera overrides (apply to every selected camera)")
    tune.add_argument("--fps", type=float, help="frame rate cap, 0 = unlimited")
    tune.add_argument("--roi", type=roi, help="crop x,y,w,h")
    tune.add_argument("--encoding", choices=["jpeg", "png", "raw"])
    tune.add_argument("--quality", type=int, help="JPEG quality 1-100")
    tune.add_argument("--maxlen", type=int, help="approximate MAXLEN of frames:{cam}")
    tune.add_argument("--loop", action="store_true", default=None, help="replay forever")
    tune.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="live behaviour (drop when Redis lags) even for files/folders",
    )


def _capture_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("fps", "roi", "encoding", "quality", "maxlen", "loop", "realtime"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = list(value) if name == "roi" else value
    return out


def _selected_cameras(config: LineConfig, args: argparse.Namespace) -> list[CameraSettings]:
    tweaks = _capture_overrides(args)
    if args.source:
        try:
            return [CameraSettings(id=args.id, source=args.source, **tweaks)]
        except ValueError as exc:
            fail(f"--source/--id and overrides: {exc}")
    try:
        chosen = [config.camera(cam) for cam in args.camera] if args.camera else config.cameras
    except ConfigError as exc:
        fail(str(exc))
    if not chosen:
        fail("no cameras: give --source PATH or a config with a cameras: section")
    if not tweaks:
        return list(chosen)
    try:
        return [CameraSettings.model_validate({**c.model_dump(), **tweaks}) for c in chosen]
    except ValueError as exc:
        fail(f"capture overrides: {exc}")


def cmd_capture(args: argparse.Namespace) -> int:
    from pipeline.stages.capture import CaptureStats, run_capture

    config = load_command_config(args)
    cameras = _selected_cameras(config, args)
    client = connect_redis(config, "efficientad-capture", check=False)  # Redis may be down
    keys = config.keys
    stop = threading.Event()
    stop_on_signals(stop)
    results: dict[str, CaptureStats] = {}

    def one(camera: CameraSettings) -> None:
        results[camera.id] = run_capture(camera, client, keys, stop)

    with serve_stage(config, client):
        log.info(
            "capture starting",
            extra={"cameras": [c.id for c in cameras], "redis": redact_url(config.redis.url or "")},
        )
        _status(client, keys, "process.started", {"cameras": [c.id for c in cameras]})
        threads = [
            threading.Thread(target=one, args=(cam,), name=f"capture-{cam.id}", daemon=True)
            for cam in cameras
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(0.2)
        code = EXIT_OK
        for cam_id, stats in results.items():
            log.info(
                "capture done",
                extra={
                    "camera": cam_id,
                    "frames_read": stats.frames_read,
                    "frames_written": stats.frames_written,
                    "frames_dropped": stats.frames_dropped,
                    "finished": stats.finished,
                    "error": stats.error,
                    "fps": round(stats.frames_read / max(stats.duration_s, 1e-9), 1),
                },
            )
            if stats.error is not None:
                code = max(code, EXIT_USAGE if stats.error_is_permanent else EXIT_FAILURE)
        _status(
            client,
            keys,
            "process.stopped",
            {"exit_code": code, "s": round(time.monotonic() - started, 2)},
        )
    return code


def _status(client: Any, keys: Any, event: str, detail: dict[str, Any]) -> None:
    """Best effort: frames matter more than the process events around them."""
    status = StatusEvent(event=event, source="capture", detail=detail)  # type: ignore[arg-type]
    emit_status_quietly(client, keys, status, log, logging.DEBUG)
