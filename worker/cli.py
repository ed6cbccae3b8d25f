"""CLI subcommands ``worker``, ``publish`` and ``alarms``.

Each handler returns the exit code: 0 done (also after SIGTERM/SIGINT), 1 runtime failure,
2 bad configuration or arguments (the same code every stage uses, so ``efficientad run`` does not
restart a child whose config can never work), including a Redis user that lacks a permission of
its role (NOPERM, at connect or later).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, LineConfig, add_config_arguments, load_command_config

if TYPE_CHECKING:
    import redis

    from models.inference import InferenceEngine
    from pipeline.observability import Heartbeat

__all__ = ["register"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG_ERROR = 0, 1, 2

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``worker``, ``publish`` and ``alarms`` to the ``efficientad`` CLI."""
    wk = subparsers.add_parser(
        "worker",
        help="score frames from Redis with the configured models (scale out: start more)",
        description=(
            "Join the consumer group on every configured camera stream, batch frames across "
            "cameras per model, score them and write one result per frame to results:{cam}. "
            "Start as many as the GPUs/CPUs allow, on any host; give each its own --index "
            "(or --consumer) so that a restarted worker finishes its own pending frames."
        ),
    )
    add_config_arguments(wk)
    wk.add_argument("--index", type=int, default=None, help="worker slot on this host (0, 1, ...)")
    wk.add_argument("--consumer", default=None, help="consumer name (default worker-<host>[-N])")
    wk.add_argument(
        "--camera", action="append", default=[], help="serve only this camera (repeatable)"
    )
    wk.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    wk.add_argument("--half", action="store_true", default=None, help="fp16 on CUDA")
    wk.add_argument("--batch-size", type=int, default=None, help="max frames per model call")
    wk.add_argument(
        "--max-results", type=int, default=None, help="exit after this many results (benchmarks)"
    )
    wk.add_argument(
        "--idle-exit", type=float, default=None, help="exit after this many seconds without work"
    )
    wk.set_defaults(func=cmd_worker)

    pub = subparsers.add_parser(
        "publish",
        help="turn results into alarm episodes on the alarms streams",
        description=(
            "Own cameras through leases in Redis (one publisher per camera at a time; start a "
            "second one as a hot standby), order and de-duplicate results, run the alarm state "
            "machine and emit alarm.started / alarm.updated / alarm.ended events."
        ),
    )
    add_config_arguments(pub)
    pub.add_argument("--name", default=None, help="publisher name (default publisher-<host>)")
    pub.add_argument(
        "--camera", action="append", default=[], help="serve only this camera (repeatable)"
    )
    pub.add_argument(
        "--idle-exit", type=float, default=None, help="exit after this many seconds without work"
    )
    pub.set_defaults(func=cmd_publish)

    al = subparsers.add_parser(
        "alarms",
        help="follow alarm events (human-readable or JSON lines)",
        description="Print alarm events as they arrive; optionally save masks and overlays.",
    )
    add_config_arguments(al)
    al.add_argument("--camera", default=None, help="follow one camera only")
    al.add_argument(
        "--from",
        dest="start",
        default="$",
        metavar="ID",
        help="'$' = new events only (default), '0' = all retained, or an entry id to resume after",
    )
    al.add_argument("--json", action="store_true", help="one JSON object per line")
    al.add_argument("--save-dir", type=Path, default=None, help="write masks/overlays/JSON here")
    al.add_argument("--count", type=int, default=None, help="exit after this many events")
    al.add_argument(
        "--timeout", type=float, default=None, help="exit after this many seconds without events"
    )
    al.set_defaults(func=cmd_alarms)


# ------------------------------------------------------------------------------------ helpers


def _connect(config: LineConfig, name: str) -> tuple[redis.Redis | None, int]:
    """(client, 0), or (None, exit code) after printing why."""
    from pipeline.redis_conn import (
        RedisPermissionError,
        RedisUnavailableError,
        RedisVersionError,
        connect,
    )

    try:
        return connect(config.redis, client_name=name), EXIT_OK
    except RedisPermissionError as exc:
        print(f"efficientad: {exc}", file=sys.stderr)
        return None, EXIT_CONFIG_ERROR
    except (RedisUnavailableError, RedisVersionError) as exc:
        print(f"efficientad: {exc}", file=sys.stderr)
        return None, EXIT_FAILURE


def _permission_denied(exc: BaseException, command: str) -> bool:
    """Print and say True when ``exc`` is an ACL denial (exit 2, a restart cannot fix it)."""
    from pipeline.redis_conn import is_permission_error

    if not is_permission_error(exc):
        return False
    print(
        f"efficientad {command}: the Redis user lacks a permission ({exc}); give it the role's "
        "ACL (`efficientad redis-acl`, pipeline/acl.py)",
        file=sys.stderr,
    )
    return True


def _heartbeat(config: LineConfig) -> Heartbeat:
    """The process heartbeat for /healthz, its limit above the longest legitimate Redis stall."""
    from pipeline.observability import HEARTBEAT
    from pipeline.redis_conn import stall_limit_s

    HEARTBEAT.min_limit_s = max(HEARTBEAT.min_limit_s, stall_limit_s(config.redis))
    return HEARTBEAT


def _cameras(config: LineConfig, wanted: list[str], command: str) -> list[str] | None:
    known = config.camera_ids()
    if not known:
        print(f"efficientad {command}: the config has no cameras", file=sys.stderr)
        return None
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        print(f"efficientad {command}: unknown --camera {unknown} (have {known})", file=sys.stderr)
        return None
    return wanted or known


def load_engines(config: LineConfig, cameras: list[str]) -> dict[str, InferenceEngine]:
    """camera -> engine, loading each model directory once (cameras share engines per model)."""
    from models.inference import InferenceEngine

    by_model: dict[str, InferenceEngine] = {}
    out: dict[str, InferenceEngine] = {}
    for cam in cameras:
        model = config.camera(cam).model
        if model not in config.models:
            raise ConfigError(
                f"cameras[id={cam}].model: {model!r} -> not in models: {sorted(config.models)}"
            )
        if model not in by_model:
            by_model[model] = InferenceEngine.load(
                config.models[model], device=config.worker.device, half=config.worker.half
            )
            log.info(
                "model loaded",
                extra={
                    "model": model,
                    "path": str(config.models[model]),
                    "device": str(by_model[model].device),
                    "sha256": by_model[model].info.sha256[:12],
                },
            )
        out[cam] = by_model[model]
    return out


# ----------------------------------------------------------------------------------- commands


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.observability import redis_ready_check, start_metrics_server
    from worker.service import FrameWorker

    overrides: dict[str, Any] = {}
    for flag, key in (("device", "device"), ("half", "half"), ("batch_size", "batch_size")):
        if getattr(args, flag) is not None:
            overrides[f"worker.{key}"] = getattr(args, flag)
    if args.consumer:
        overrides["worker.consumer"] = args.consumer
    config = load_command_config(args, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    cameras = _cameras(config, args.camera, "worker")
    if cameras is None:
        return EXIT_CONFIG_ERROR
    try:
        engines = load_engines(config, cameras)
    except ConfigError as exc:
        print(f"efficientad worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (OSError, ValueError, RuntimeError) as exc:  # bad checkpoint, no CUDA, ...
        print(f"efficientad worker: cannot load a model: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    consumer = config.worker.consumer_name(args.index)
    client, code = _connect(config, consumer)
    if client is None:
        return code
    worker = FrameWorker(client, config.keys, config.worker, engines, consumer=consumer)
    worker.install_signal_handlers()
    server = start_metrics_server(
        config.metrics, redis_ready_check(client), heartbeat=_heartbeat(config)
    )
    try:
        worker.run(max_results=args.max_results, idle_exit_s=args.idle_exit)
    except Exception as exc:
        if _permission_denied(exc, "worker"):
            return EXIT_CONFIG_ERROR
        raise
    finally:
        if server is not None:
            server.close()
        client.close()
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    from pipeline.observability import redis_ready_check, start_metrics_server
    from pipeline.publisher import AlarmPublisher

    overrides = {"publisher.consumer": args.name} if args.name else None
    config = load_command_config(args, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    cameras = _cameras(config, args.camera, "publish")
    if cameras is None:
        return EXIT_CONFIG_ERROR
    client, code = _connect(config, config.publisher.consumer_name())
    if client is None:
        return code
    try:
        publisher = AlarmPublisher(
            client,
            config.keys,
            config.publisher,
            cameras,
            worker_group=config.worker.group,
        )
    except ValueError as exc:  # e.g. an unreadable ignore mask
        print(f"efficientad publish: {exc}", file=sys.stderr)
        client.close()
        return EXIT_CONFIG_ERROR
    publisher.install_signal_handlers()
    server = start_metrics_server(
        config.metrics, redis_ready_check(client), heartbeat=_heartbeat(config)
    )
    try:
        publisher.run(idle_exit_s=args.idle_exit)
    except Exception as exc:
        if _permission_denied(exc, "publish"):
            return EXIT_CONFIG_ERROR
        raise
    finally:
        if server is not None:
            server.close()
        client.close()
    return EXIT_OK


def cmd_alarms(args: argparse.Namespace) -> int:
    from pipeline.subscribe import print_alarms

    args.no_metrics = True  # a terminal tool: no HTTP port
    config = load_command_config(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    client, code = _connect(config, "alarms-cli")
    if client is None:
        return code
    try:
        print_alarms(
            client,
            config.keys,
            cam=args.camera,
            start=args.start,
            as_json=args.json,
            save_dir=args.save_dir,
            count=args.count,
            idle_timeout_s=args.timeout,
        )
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `efficientad alarms | head`
        sys.stderr.close()
    except Exception as exc:
        if _permission_denied(exc, "alarms"):
            return EXIT_CONFIG_ERROR
        raise
    finally:
        client.close()
    return EXIT_OK
