"""``efficientad bench model``: the bare model's speed (ms/image, images/s, peak memory).

Exit codes: 0 measured, 2 bad arguments. The pipeline's speed is ``bench pipeline``
(``pipeline.tools.commands``); accuracy is ``efficientad accuracy``.
"""

from __future__ import annotations

import argparse
from typing import Any

from efficientad.cli_support import (
    DEFAULT_IMAGE_SIZE,
    add_bench_command,
    positive_int,
    run_bench,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bench model`` to the ``efficientad`` CLI."""
    model = add_bench_command(
        sub,
        "model",
        cmd_bench_model,
        help="bare inference ms/image and images/s of EfficientAD-S/M (random weights)",
        description=(
            "Time InferenceEngine.predict (uint8 frames in, scores and maps out) for each "
            "model size and batch size, each in a fresh process so peak RSS is its own. Random "
            "weights: the cost does not depend on the values. JSON on stdout."
        ),
    )
    model.add_argument("--model-size", nargs="+", choices=["s", "m"], default=["s", "m"])
    model.add_argument("--batch", nargs="+", type=positive_int, default=[1, 8])
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--half", action="store_true", help="fp16 on CUDA")
    model.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE[0], help="input size in px"
    )
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    model.add_argument(
        "--min-seconds", type=float, default=3.0, help="time each case at least this long"
    )


def cmd_bench_model(args: argparse.Namespace) -> int:
    from models.speed_bench import ModelBenchSettings, bench_model

    return run_bench(
        bench_model,
        ModelBenchSettings,
        args,
        sizes=list(args.model_size),
        batches=list(args.batch),
    )
