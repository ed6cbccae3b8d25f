"""CLI subcommands of the model side: ``synth``, ``eval``, ``predict`` and ``benchmark``.

Each handler returns the process exit code: 0 success, 1 runtime failure, 2 bad input (missing or
unreadable data, invalid model directory, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from models.data import DataError

__all__ = ["register"]

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def image_size_arg(text: str) -> tuple[int, int]:
    """``256`` or ``256x320`` (height x width)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"size must be N or HxW, got {text!r}")
    return parts[0], parts[1]


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 inference (GPU)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``synth``, ``eval``, ``predict`` and ``benchmark`` to the ``efficientad`` CLI."""
    synth = subparsers.add_parser(
        "synth",
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
    synth.add_argument("--train", type=_positive, default=60, help="good training images")
    synth.add_argument("--test-good", type=_non_negative, default=20, help="good test images")
    synth.add_argument(
        "--test-defect", type=_non_negative, default=8, help="defective test images per defect type"
    )
    synth.add_argument(
        "--size", type=image_size_arg, default=(256, 256), help="N or HxW (default 256)"
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
        type=_non_negative,
        default=0,
        metavar="N",
        help="also write a line stream of N frames",
    )
    line.add_argument("--line-only", action="store_true", help="write only the line stream")
    line.add_argument(
        "--episodes",
        type=_non_negative,
        default=None,
        help="defect episodes in the stream (default: one per 60 frames)",
    )
    line.add_argument(
        "--episode-length",
        type=_positive,
        nargs=2,
        default=(4, 8),
        metavar=("MIN", "MAX"),
        help="episode length range in frames",
    )
    line.add_argument(
        "--episode-gap", type=_non_negative, default=12, help="minimum clean frames around episodes"
    )
    line.add_argument("--fps", type=float, default=10.0, help="frame rate of line.avi")
    line.add_argument("--no-video", action="store_true", help="skip line.avi")
    synth.set_defaults(func=cmd_synth)

    ev = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset's test split (AUROC, F1, pixel AUROC, AU-PRO)",
        description="Evaluate MODEL on the test split of DATA (MVTec or folder layout).",
    )
    ev.add_argument("--model", type=Path, required=True, help="model directory")
    ev.add_argument("--data", type=Path, required=True, help="dataset (category) root")
    ev.add_argument("--json", type=Path, help="write the full report (with per-image scores)")
    ev.add_argument("--fpr-limit", type=float, default=0.3, help="AU-PRO integration limit")
    _add_inference_args(ev)
    ev.set_defaults(func=cmd_eval)

    pr = subparsers.add_parser(
        "predict",
        help="score images with a model; optional raw maps and heat-map overlays",
        description=(
            "Print raw score, normalised score (0.5 = threshold) and label for each image. "
            "IMAGES are files or folders."
        ),
    )
    pr.add_argument("--model", type=Path, required=True, help="model directory")
    pr.add_argument("images", type=Path, nargs="+", metavar="IMAGES")
    pr.add_argument("--recursive", action="store_true", help="search folders recursively")
    pr.add_argument("--json", type=Path, help="write results as JSON")
    pr.add_argument("--maps-dir", type=Path, help="write <stem>.npy raw float32 anomaly maps")
    pr.add_argument("--overlay-dir", type=Path, help="write <stem>.png heat-map overlays")
    _add_inference_args(pr)
    pr.set_defaults(func=cmd_predict)

    bm = subparsers.add_parser(
        "benchmark",
        help="train and evaluate every category of an MVTec-style root; anomalib-style tables",
        description=(
            "For each category (folder with train/good) under ROOT: train, evaluate, print the "
            "Image-Level AUC and Image F1 tables and write all metrics and timings as JSON."
        ),
    )
    bm.add_argument("--root", type=Path, required=True, help="MVTec AD root or one category")
    bm.add_argument("--categories", nargs="+", help="subset of categories (folder names)")
    bm.add_argument("--steps", type=_positive, default=70_000, help="training steps (paper: 70k)")
    bm.add_argument(
        "--model-size", nargs="+", choices=["s", "m"], default=["s"], help="one or both model sizes"
    )
    bm.add_argument("--teacher", default="auto", help="auto, random, or a teacher file")
    bm.add_argument("--penalty-images", type=Path, help="ImageNet-like images for the penalty")
    bm.add_argument("--seed", type=int, default=42)
    bm.add_argument("--image-size", type=image_size_arg, default=(256, 256))
    bm.add_argument("--batch-size", type=_positive, default=8, help="evaluation batch size")
    bm.add_argument("--device", default="auto", help="evaluation device")
    bm.add_argument(
        "--out-dir",
        type=Path,
        default=Path("benchmark_runs"),
        help="where trained models go (OUT/<size>/<category>)",
    )
    bm.add_argument("--json", type=Path, help="results JSON (default OUT_DIR/benchmark.json)")
    bm.set_defaults(func=cmd_benchmark)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def cmd_synth(args: argparse.Namespace) -> int:
    from models.synth import generate_mvtec, plan_episodes, write_line

    if args.line_only and not args.line:
        _error("--line-only needs --line N")
        return EXIT_BAD_INPUT
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
        _error(str(exc))
        return EXIT_BAD_INPUT
    return EXIT_OK


def _load_engine(args: argparse.Namespace):
    from models.checkpoint import CheckpointError
    from models.inference import InferenceEngine

    try:
        return InferenceEngine.load(args.model, device=args.device, half=args.half)
    except (CheckpointError, FileNotFoundError) as exc:
        _error(f"cannot load model {args.model}: {exc}")
        return None


def cmd_eval(args: argparse.Namespace) -> int:
    from models.data import discover_dataset
    from models.evaluate import evaluate

    try:
        dataset = discover_dataset(args.data)
    except DataError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    engine = _load_engine(args)
    if engine is None:
        return EXIT_BAD_INPUT
    from tqdm import tqdm

    bar = tqdm(total=len(dataset.test), desc="eval", unit="img", disable=None, file=sys.stderr)
    try:
        report = evaluate(
            engine,
            dataset,
            batch_size=args.batch_size,
            fpr_limit=args.fpr_limit,
            progress=lambda done, _total: bar.update(done - bar.n),
        )
    except DataError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    finally:
        bar.close()
    print(report.to_text())
    if args.json:
        _write_json(args.json, report.to_dict())
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from models.predict import collect_images, format_predictions, predict_paths

    try:
        paths = collect_images(args.images, recursive=args.recursive)
    except DataError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    engine = _load_engine(args)
    if engine is None:
        return EXIT_BAD_INPUT
    results = predict_paths(engine, paths, args.maps_dir, args.overlay_dir, args.batch_size)
    print(format_predictions(results))
    if args.json:
        info = engine.info
        _write_json(
            args.json,
            {
                "model": {
                    "name": info.name,
                    "version": info.version,
                    "sha256": info.sha256,
                    "threshold": info.threshold,
                    "image_size": list(info.image_size),
                },
                "images": [r.to_dict() for r in results],
            },
        )
    failed = sum(r.error is not None for r in results)
    if failed:
        _error(f"{failed} of {len(results)} images could not be read")
        return EXIT_BAD_INPUT
    return EXIT_OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    from models.benchmark import BenchmarkConfig, markdown_tables, run_benchmark

    config = BenchmarkConfig(
        root=args.root,
        out_dir=args.out_dir,
        categories=args.categories,
        model_sizes=args.model_size,
        steps=args.steps,
        teacher=args.teacher,
        penalty_images=args.penalty_images,
        seed=args.seed,
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        json_path=args.json or args.out_dir / "benchmark.json",
    )
    try:
        result = run_benchmark(config)
    except DataError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    print()
    print(markdown_tables(result))
    print(f"results: {config.json_path}")
    return EXIT_FAILURE if result.failed else EXIT_OK
