"""CLI subcommands ``demo`` and ``bench`` (``bench pipeline``, ``bench model``).

Exit codes: 0 success; 1 the run failed its own check (frames lost, duplicates, dead letters);
2 bad arguments; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cmd_bench_model", "cmd_bench_pipeline", "cmd_demo", "register"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``demo`` and ``bench`` to the ``efficientad`` CLI."""
    from models.synth import DEFECT_TYPES
    from pipeline.demo import DEFAULT_TRAIN_STEPS, DEMO_DEFECTS, DEMO_LR

    demo = subparsers.add_parser(
        "demo",
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
    demo.add_argument("--frames", type=_positive_int, default=120, help="frames on the line")
    demo.add_argument("--episodes", type=int, default=3, help="defect episodes to inject")
    demo.add_argument(
        "--train-steps", type=_positive_int, default=DEFAULT_TRAIN_STEPS, help="training steps"
    )
    demo.add_argument(
        "--train-images", type=_positive_int, default=48, help="normal training images"
    )
    demo.add_argument(
        "--train-lr", type=_positive_float, default=DEMO_LR, help="learning rate of the training"
    )
    demo.add_argument(
        "--defects",
        nargs="+",
        choices=list(DEFECT_TYPES),
        default=list(DEMO_DEFECTS),
        help="defect types to inject (cycled over the episodes)",
    )
    demo.add_argument("--workers", type=_positive_int, default=2, help="worker processes")
    demo.add_argument("--batch-size", type=_positive_int, default=4, help="worker batch size")
    demo.add_argument(
        "--fps", type=_positive_float, default=None, help="camera rate (default: from capacity)"
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
    demo.set_defaults(func=cmd_demo)

    bench = subparsers.add_parser(
        "bench",
        help="throughput/latency benchmarks: the streaming pipeline and the bare model",
        description="Benchmarks that print JSON: `bench pipeline` and `bench model`.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    bench.set_defaults(func=lambda _args: bench.print_help() or EXIT_USAGE)

    pipe = sub.add_parser(
        "pipeline",
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
    pipe.add_argument("--frames", type=_positive_int, default=64, help="frames per phase")
    pipe.add_argument("--batch-size", type=_positive_int, default=8, help="worker batch size")
    pipe.add_argument("--workers", type=_positive_int, default=1, help="worker processes")
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
    pipe.add_argument("--json", action="store_true", help="JSON only (no progress lines)")
    pipe.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    pipe.set_defaults(func=cmd_bench_pipeline)

    model = sub.add_parser(
        "model",
        help="bare inference ms/image and images/s of EfficientAD-S/M (random weights)",
        description=(
            "Time InferenceEngine.predict (uint8 frames in, scores and maps out) for each "
            "model size and batch size, each in a fresh process so peak RSS is its own. Random "
            "weights: the cost does not depend on the values. JSON on stdout."
        ),
    )
    model.add_argument("--model-size", nargs="+", choices=["s", "m"], default=["s", "m"])
    model.add_argument("--batch", nargs="+", type=_positive_int, default=[1, 8])
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    model.add_argument("--half", action="store_true", help="fp16 on CUDA")
    model.add_argument("--image-size", type=int, default=256, help="input size in px")
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    model.add_argument(
        "--min-seconds", type=float, default=3.0, help="time each case at least this long"
    )
    model.add_argument("--json", action="store_true", help="JSON only (no progress lines)")
    model.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    model.set_defaults(func=cmd_bench_model)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoError, DemoSettings, run_demo

    _setup_logging()
    settings = DemoSettings(
        out=args.out,
        frames=args.frames,
        episodes=args.episodes,
        train_steps=args.train_steps,
        train_images=args.train_images,
        train_lr=args.train_lr,
        defects=tuple(args.defects),
        workers=args.workers,
        batch_size=args.batch_size,
        fps=args.fps,
        model=args.model,
        seed=args.seed,
        keep=args.keep,
        color=False if args.no_color else None,
    )
    try:
        summary = run_demo(settings)
    except DemoError as exc:
        print(f"efficientad demo: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary.exit_code


def _emit(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from pipeline.bench import BenchError, PipelineBenchSettings, bench_pipeline

    _setup_logging()
    settings = PipelineBenchSettings(
        model=args.model,
        frames=args.frames,
        batch_size=args.batch_size,
        workers=args.workers,
        size=args.size,
        encoding=args.encoding,
        latency_load=args.latency_load,
        latency_frames=args.latency_frames,
        device=args.device,
        half=args.half,
        redis_url=args.redis_url,
    )
    return _run_bench("pipeline", bench_pipeline, settings, args, BenchError)


def cmd_bench_model(args: argparse.Namespace) -> int:
    from pipeline.bench import BenchError, ModelBenchSettings, bench_model

    _setup_logging()
    settings = ModelBenchSettings(
        sizes=list(args.model_size),
        batches=list(args.batch),
        device=args.device,
        half=args.half,
        image_size=args.image_size,
        threads=args.threads,
        min_seconds=args.min_seconds,
    )
    return _run_bench("model", bench_model, settings, args, BenchError)


def _run_bench(
    name: str,
    bench: Callable[..., dict],
    settings: object,
    args: argparse.Namespace,
    error: type[Exception],
) -> int:
    """Progress on stderr unless --json; bad settings exit 2, a failed check exits 1."""
    try:
        report = bench(settings, progress=None if args.json else sys.stderr)
    except error as exc:
        print(f"efficientad bench {name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _emit(report, args.out)
    return EXIT_OK if report["ok"] else EXIT_FAILURE
