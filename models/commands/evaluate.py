"""``eval``, ``predict`` and ``accuracy``: score a model on data, from one image to all of MVTec.

``accuracy`` (train + evaluate every category, anomalib-style tables) was called ``benchmark``;
the speed benches are ``bench model`` and ``bench pipeline``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficientad.cli_support import (
    DEFAULT_IMAGE_SIZE,
    EXIT_FAILURE,
    EXIT_OK,
    add_command,
    fail,
    model_image_size,
    positive_int,
    settings_from_args,
    write_json,
)

if TYPE_CHECKING:
    from models.inference import InferenceEngine

__all__ = ["register"]


def _add_inference_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--half", action="store_true", help="fp16 inference (GPU)")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``eval``, ``predict`` and ``accuracy`` to the ``efficientad`` CLI."""
    ev = add_command(
        sub,
        "eval",
        cmd_eval,
        help="evaluate a model on a dataset's test split (AUROC, F1, pixel AUROC, AU-PRO)",
        description="Evaluate MODEL on the test split of DATA (MVTec or folder layout).",
    )
    ev.add_argument("--model", type=Path, required=True, help="model directory")
    ev.add_argument("--data", type=Path, required=True, help="dataset (category) root")
    ev.add_argument("--json", type=Path, help="write the full report (with per-image scores)")
    ev.add_argument("--fpr-limit", type=float, default=0.3, help="AU-PRO integration limit")
    _add_inference_args(ev)

    pr = add_command(
        sub,
        "predict",
        cmd_predict,
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

    ac = add_command(
        sub,
        "accuracy",
        cmd_accuracy,
        help="train and evaluate every category of an MVTec-style root; anomalib-style tables",
        description=(
            "The accuracy benchmark. For each category (folder with train/good) under ROOT: "
            "train, evaluate, print the Image-Level AUC and Image F1 tables and write all metrics "
            "and timings as JSON. (Speed: `efficientad bench model|pipeline`.)"
        ),
    )
    ac.add_argument("--root", type=Path, required=True, help="MVTec AD root or one category")
    ac.add_argument("--categories", nargs="+", help="subset of categories (folder names)")
    ac.add_argument(
        "--steps", type=positive_int, default=70_000, help="training steps (paper: 70k)"
    )
    ac.add_argument(
        "--model-size", nargs="+", choices=["s", "m"], default=["s"], help="one or both model sizes"
    )
    ac.add_argument("--teacher", default="auto", help="auto, random, or a teacher file")
    ac.add_argument("--penalty-images", type=Path, help="ImageNet-like images for the penalty")
    ac.add_argument("--seed", type=int, default=42)
    ac.add_argument("--image-size", type=model_image_size, default=DEFAULT_IMAGE_SIZE)
    ac.add_argument("--batch-size", type=positive_int, default=8, help="evaluation batch size")
    ac.add_argument("--device", default="auto", help="evaluation device")
    ac.add_argument(
        "--out-dir",
        type=Path,
        default=Path("accuracy_runs"),
        help="where trained models go (OUT/<size>/<category>)",
    )
    ac.add_argument("--json", type=Path, help="results JSON (default OUT_DIR/accuracy.json)")


def _load_engine(args: argparse.Namespace) -> InferenceEngine:
    from models.checkpoint import CheckpointError
    from models.inference import InferenceEngine

    try:
        return InferenceEngine.load(args.model, device=args.device, half=args.half)
    except (CheckpointError, FileNotFoundError) as exc:
        fail(f"cannot load model {args.model}: {exc}")


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.data import DataError, discover_dataset
    from models.evaluate import evaluate

    try:
        dataset = discover_dataset(args.data)
    except DataError as exc:
        fail(str(exc))
    engine = _load_engine(args)
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
        fail(str(exc))
    finally:
        bar.close()
    print(report.to_text())
    if args.json:
        write_json(args.json, report.to_dict())
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from models.data import DataError
    from models.predict import collect_images, format_predictions, predict_paths

    try:
        paths = collect_images(args.images, recursive=args.recursive)
    except DataError as exc:
        fail(str(exc))
    engine = _load_engine(args)
    results = predict_paths(engine, paths, args.maps_dir, args.overlay_dir, args.batch_size)
    print(format_predictions(results))
    if args.json:
        info = engine.info
        write_json(
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
        fail(f"{failed} of {len(results)} images could not be read")
    return EXIT_OK


def cmd_accuracy(args: argparse.Namespace) -> int:
    from models.accuracy import AccuracyConfig, markdown_tables, run_accuracy
    from models.data import DataError

    config = settings_from_args(
        AccuracyConfig,
        args,
        model_sizes=args.model_size,
        json_path=args.json or args.out_dir / "accuracy.json",
    )
    try:
        result = run_accuracy(config)
    except DataError as exc:
        fail(str(exc))
    print()
    print(markdown_tables(result))
    print(f"results: {config.json_path}")
    return EXIT_FAILURE if result.failed else EXIT_OK
