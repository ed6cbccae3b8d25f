"""``efficientad worker``: one batching inference worker (start as many as the hardware allows).

Exit codes: 0 done (also after SIGTERM/SIGINT), 1 runtime failure, 2 bad configuration or
arguments, including a model that cannot load and a Redis user that lacks a permission of its
role (NOPERM, at connect or later): ``efficientad run`` does not restart a child whose config can
never work.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from efficientad.cli_support import (
    EXIT_OK,
    add_command,
    add_config_arguments,
    connect_redis,
    fail,
    load_command_config,
    select_cameras,
    serve_stage,
)
from pipeline.core.config import ConfigError, LineConfig

if TYPE_CHECKING:
    from models.inference import InferenceEngine

__all__ = ["cmd_worker", "load_engines", "register"]

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``worker`` to the ``efficientad`` CLI."""
    wk = add_command(
        sub,
        "worker",
        cmd_worker,
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


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.service import FrameWorker

    overrides: dict[str, Any] = {}
    for flag in ("device", "half", "batch_size"):
        if getattr(args, flag) is not None:
            overrides[f"worker.{flag}"] = getattr(args, flag)
    if args.consumer:
        overrides["worker.consumer"] = args.consumer
    config = load_command_config(args, overrides)
    cameras = select_cameras(config, args.camera)
    try:
        engines = load_engines(config, cameras)
    except ConfigError as exc:
        fail(str(exc))
    except (OSError, ValueError, RuntimeError) as exc:  # bad checkpoint, no CUDA, ...
        fail(f"cannot load a model: {exc}")
    consumer = config.worker.consumer_name(args.index)
    client = connect_redis(config, consumer)
    worker = FrameWorker(client, config.keys, config.worker, engines, consumer=consumer)
    worker.install_signal_handlers()
    with serve_stage(config, client):
        worker.run(max_results=args.max_results, idle_exit_s=args.idle_exit)
    return EXIT_OK
