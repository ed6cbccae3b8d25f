"""``efficientad bench pipeline``: frames/s and latency through Redis next to the bare model.

Exit codes: 0 no frame lost, 1 the run failed its own check (frames lost, duplicated or
dead-lettered), 2 bad arguments. ``bench model`` lives beside the model (``models.commands``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from efficientad.cli_support import add_bench_command, positive_int, run_bench

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bench pipeline`` to the ``efficientad`` CLI."""
    pipe = add_bench_command(
        sub,
        "pipeline",
        cmd_bench_pipeline,
        help="frames/s and latency through Redis next to the bare model on the same frames",
        description=(
            "Replay synthetic line frames through an embedded Redis (or --redis-url): capture "
            "-> workers -> results, saturated, then paced at a fraction of capacity for "
            "latency; score the very same frames with the bare model at the same batch size in "
            "the same run and report the throughput ratio (target >= 0.90) and lost frames "
            "(must be 0). JSON on stdout."
        ),
    )
    pipe.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (default: a tiny model trained on synthetic data, fine for timing)",
    )
    pipe.add_argument("--frames", type=positive_int, default=64, help="frames per phase")
    pipe.add_argument("--batch-size", type=positive_int, default=8, help="worker batch size")
    pipe.add_argument("--workers", type=positive_int, default=1, help="worker processes")
    pipe.add_argument(
        "--size", type=int, default=None, help="frame size in px (default: the model's)"
    )
    pipe.add_argument("--encoding", choices=["jpeg", "png", "raw"], default="jpeg")
    pipe.add_argument(
        "--latency-load",
        type=float,
        default=0.5,
        help="paced phase: camera rate as a fraction of the measured throughput (0 = skip)",
    )
    pipe.add_argument("--latency-frames", type=int, default=None, help="frames of the paced phase")
    pipe.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    pipe.add_argument("--half", action="store_true", help="fp16 on CUDA")
    pipe.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from pipeline.tools.bench_pipeline import PipelineBenchSettings, bench_pipeline

    return run_bench(bench_pipeline, PipelineBenchSettings, args)
