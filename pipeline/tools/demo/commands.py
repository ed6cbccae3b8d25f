"""``efficientad demo`` (the whole product on this box) and ``efficientad synth`` (its data).

Exit codes: 0 success; 1 the run failed its own check (frames lost, duplicates, dead letters);
2 bad arguments; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from efficientad.cli_support import (
    DEFAULT_IMAGE_SIZE,
    EXIT_OK,
    add_command,
    basic_logging,
    fail,
    image_size,
    non_negative_int,
    positive_float,
    positive_int,
    settings_from_args,
    write_json,
)
from pipeline.tools.demo.scenario import DEFAULT_TRAIN_STEPS, DEMO_DEFECTS, DEMO_LR
from pipeline.tools.scene import DEFECT_TYPES

__all__ = ["cmd_demo", "cmd_synth", "register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``demo`` and ``synth`` to the ``efficientad`` CLI."""
    demo = add_command(
        sub,
        "demo",
        cmd_demo,
        help="the whole line on this box: synthetic line, training, Redis, workers, alarms",
        description=(
            "Generate a synthetic production line with known defect episodes, train a small "
            "EfficientAD-S on its normal parts, stream the line through an embedded Redis, "
            "capture, workers and the alarm publisher (real processes), show scores and alarms "
            "live, write alarm masks/overlays to --out and end with a scorecard. Needs nothing "
            "but this package; under 5 minutes on two CPU cores. Exit code 1 when the pipeline "
            "lost, duplicated or dead-lettered a frame."
        ),
    )
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder")
    demo.add_argument("--json", type=Path, default=None, metavar="FILE", help="summary as JSON")
    demo.add_argument("--frames", type=positive_int, default=120, help="frames on the line")
    demo.add_argument("--episodes", type=int, default=3, help="defect episodes to inject")
    demo.add_argument(
        "--train-steps", type=positive_int, default=DEFAULT_TRAIN_STEPS, help="training steps"
    )
    demo.add_argument(
        "--train-images", type=positive_int, default=48, help="normal training images"
    )
    demo.add_argument(
        "--train-lr", type=positive_float, default=DEMO_LR, help="learning rate of the training"
    )
    demo.add_argument(
        "--defects",
        nargs="+",
        choices=list(DEFECT_TYPES),
        default=list(DEMO_DEFECTS),
        help="defect types to inject (cycled over the episodes)",
    )
    demo.add_argument("--workers", type=positive_int, default=2, help="worker processes")
    demo.add_argument("--batch-size", type=positive_int, default=4, help="worker batch size")
    demo.add_argument(
        "--fps", type=positive_float, default=None, help="camera rate (default: from capacity)"
    )
    demo.add_argument(
        "--model", type=Path, default=None, help="use this model directory instead of training"
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--keep",
        action="store_true",
        help="keep training data, line frames, model and a replayable line.yaml in OUT/work",
    )
    demo.add_argument("--no-color", action="store_true", help="plain output")

    synth = add_command(
        sub,
        "synth",
        cmd_synth,
        help="generate a synthetic production-line dataset (MVTec layout) and/or line stream",
        description=(
            "Render machined flanges on a conveyor with scratch/spot/crack/missing defects into "
            "OUT/CATEGORY (train/good, test/<type>, ground_truth/<type>). With --line N, also "
            "write OUT/CATEGORY_line: N consecutive frames with defect episodes (frames/, masks/, "
            "labels.json, line.avi) for replaying through the pipeline."
        ),
    )
    synth.add_argument("--out", type=Path, required=True, help="output root folder")
    synth.add_argument("--category", default="synthetic_part")
    synth.add_argument("--train", type=positive_int, default=60, help="good training images")
    synth.add_argument("--test-good", type=non_negative_int, default=20, help="good test images")
    synth.add_argument(
        "--test-defect",
        type=non_negative_int,
        default=8,
        help="defective test images per defect type",
    )
    synth.add_argument(
        "--size", type=image_size, default=DEFAULT_IMAGE_SIZE, help="N or HxW (default 256)"
    )
    synth.add_argument("--seed", type=int, default=42)
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing category generated with other parameters",
    )
    line = synth.add_argument_group("line stream")
    line.add_argument(
        "--line",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also write a line stream of N frames",
    )
    line.add_argument("--line-only", action="store_true", help="write only the line stream")
    line.add_argument(
        "--episodes",
        type=non_negative_int,
        default=None,
        help="defect episodes in the stream (default: one per 60 frames)",
    )
    line.add_argument(
        "--episode-length",
        type=positive_int,
        nargs=2,
        default=(4, 8),
        metavar=("MIN", "MAX"),
        help="episode length range in frames",
    )
    line.add_argument(
        "--episode-gap",
        type=non_negative_int,
        default=12,
        help="minimum clean frames around episodes",
    )
    line.add_argument("--fps", type=float, default=10.0, help="frame rate of line.avi")
    line.add_argument("--no-video", action="store_true", help="skip line.avi")


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.tools.demo.run import DemoError, DemoSettings, run_demo

    basic_logging(logging.WARNING)
    settings = settings_from_args(
        DemoSettings,
        args,
        defects=tuple(args.defects),
        color=False if args.no_color else None,
    )
    try:
        summary = run_demo(settings)
    except DemoError as exc:
        fail(str(exc))
    if args.json is not None:
        write_json(args.json, summary.to_dict())
    return summary.exit_code


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.tools.scene import generate_mvtec, plan_episodes, write_line

    if args.line_only and not args.line:
        fail("--line-only needs --line N")
    try:
        if not args.line_only:
            out = generate_mvtec(
                args.out,
                args.category,
                args.train,
                args.test_good,
                args.test_defect,
                args.size,
                args.seed,
                overwrite=args.overwrite,
            )
            print(f"dataset: {out}")
        if args.line:
            episodes_wanted = (
                args.episodes if args.episodes is not None else max(1, args.line // 60)
            )
            low, high = args.episode_length
            episodes = plan_episodes(
                args.line, episodes_wanted, low, high, args.episode_gap, args.seed
            )
            line_dir = write_line(
                args.out / f"{args.category}_line",
                args.line,
                episodes,
                args.size,
                args.seed,
                args.fps,
                video=not args.no_video,
            )
            print(f"line stream: {line_dir} ({args.line} frames, {len(episodes)} episodes)")
    except (ValueError, FileExistsError) as exc:
        fail(str(exc))
    return EXIT_OK
